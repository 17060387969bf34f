from django.apps import AppConfig


class LearnerConfig(AppConfig):
    name = "learner"
    verbose_name = "Learner"

    def ready(self):
        # Robots that connect (or reconnect) are told which checkpoint the fleet runs.
        from learner import services
        from robots import fleet

        fleet.set_policy_source(services.current_policy_message)
