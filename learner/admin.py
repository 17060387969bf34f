from django.contrib import admin

from learner import services
from learner.models import Checkpoint, Deployment, Evaluation, TrainingMetric, TrainingRun


@admin.register(TrainingRun)
class TrainingRunAdmin(admin.ModelAdmin):
    list_display = ["id", "algorithm", "status", "step", "total_steps", "message", "created_at"]
    list_filter = ["status", "algorithm"]
    readonly_fields = ["status", "message", "step", "attempts", "worker", "heartbeat_at", "started_at", "finished_at"]
    fields = ["algorithm", "preset", "tasks", "total_steps", "base_checkpoint", *readonly_fields]
    actions = ["stop"]

    def save_model(self, request, obj, form, change):
        """A run added here is queued like one from the API or ``manage.py train`` (its tasks are saved after this,
        in the same transaction, before the on-commit enqueue fires)."""
        if change:
            return super().save_model(request, obj, form, change)
        from learner import queue
        from learner.config import Preset, get_preset, to_dict

        preset = get_preset(obj.preset)
        train = to_dict(preset.train) | {"algorithm": obj.algorithm}
        if obj.total_steps:
            train["steps"] = obj.total_steps
        obj.config = Preset.from_dict({"name": preset.name, "policy": to_dict(preset.policy), "train": train}).to_dict()
        obj.total_steps = obj.config["train"]["steps"]
        obj.created_by, obj.message = request.user, "queued"
        super().save_model(request, obj, form, change)
        queue.enqueue_round(obj.pk)

    @admin.action(description="Stop the selected runs")
    def stop(self, request, queryset):
        for run in queryset:
            services.stop_run(run, request.user)


@admin.register(Checkpoint)
class CheckpointAdmin(admin.ModelAdmin):
    list_display = ["version", "run", "algorithm", "step", "size", "created_at"]
    readonly_fields = [f.name for f in Checkpoint._meta.fields]
    actions = ["deploy"]

    @admin.action(description="Deploy to the fleet (roll forward or back)")
    def deploy(self, request, queryset):
        for checkpoint in queryset.order_by("version")[:1]:
            services.deploy_checkpoint(checkpoint, request.user, reason="deployed from the admin")


admin.site.register(Deployment, list_display=["checkpoint", "at", "by", "reason"])
admin.site.register(Evaluation, list_display=["checkpoint", "task", "episodes", "successes", "mean_length", "status"])
admin.site.register(TrainingMetric, list_display=["run", "step", "at"])
