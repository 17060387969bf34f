from django.apps import AppConfig


class RobotsConfig(AppConfig):
    name = "robots"
    verbose_name = "Fleet"

    def ready(self):
        from . import signals

        signals.connect()
