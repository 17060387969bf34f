"""Admin of the fleet. Tokens are issued by ``manage.py add_robot`` (shown once) and never displayed here;
episodes and the audit log come from robots and services, so they are read-only."""

from django.contrib import admin, messages

from . import fleet, tasking
from .models import AuditEvent, ControlLease, Episode, InterventionSegment, Robot, Task, TaskAssignment

LIVE_FIELDS = (
    "connected", "state", "last_seen", "connected_at", "current_task", "current_prompt", "current_episode",
    "current_step", "policy_version", "policy_name", "control_source", "loop_hz", "loop_p99_ms", "spool_pending",
    "capabilities", "agent_version", "estopped", "estopped_by", "estopped_at", "deadman", "operator_name", "video_fps",
    "viewers",
)


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


class AssignmentInline(admin.TabularInline):
    model = TaskAssignment
    extra = 0
    autocomplete_fields = ["task"]


@admin.register(Robot)
class RobotAdmin(admin.ModelAdmin):
    list_display = [
        "name", "connected", "state", "current_task", "policy_version", "last_seen", "token_prefix", "revoked_at",
    ]
    list_filter = ["connected", "state"]
    search_fields = ["name"]
    # token_hash is never listed: only the prefix identifies a token here.
    fields = ["name", "token_prefix", "token_created_at", "revoked_at", "created_at", *LIVE_FIELDS]
    readonly_fields = ["token_prefix", "token_created_at", "revoked_at", "created_at", *LIVE_FIELDS]
    inlines = [AssignmentInline]
    actions = ["revoke_token", "reassign_task"]

    def has_add_permission(self, request):
        return False  # a robot needs a token, which only `manage.py add_robot NAME` can show (once)

    def get_readonly_fields(self, request, obj=None):
        return ["name", *self.readonly_fields] if obj else self.readonly_fields

    @admin.action(description="Revoke token (closes live connections)")
    def revoke_token(self, request, queryset):
        for robot in queryset:
            fleet.revoke_robot(robot, actor=request.user)
        self.message_user(request, f"Revoked {queryset.count()} token(s).", messages.SUCCESS)

    @admin.action(description="Send a new task assignment now")
    def reassign_task(self, request, queryset):
        for robot in queryset:
            assignment = tasking.reassign_robot(robot)
            self.message_user(request, f"{robot.name}: {assignment.task or 'no task'} {assignment.prompt!r}")


@admin.register(Task)
class TaskAdmin(admin.ModelAdmin):
    list_display = ["name", "env_id", "max_steps", "enabled"]
    list_editable = ["enabled"]
    list_filter = ["enabled"]
    search_fields = ["name", "env_id"]


@admin.register(TaskAssignment)
class TaskAssignmentAdmin(admin.ModelAdmin):
    list_display = ["__str__", "robot", "task", "weight", "split"]
    list_filter = ["split", "task"]
    autocomplete_fields = ["robot", "task"]


class SegmentInline(admin.TabularInline):
    model = InterventionSegment
    extra = 0
    fields = ["start_step", "end_step", "source", "operator", "operator_name", "reason"]
    readonly_fields = fields
    can_delete = False

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(Episode)
class EpisodeAdmin(ReadOnlyAdmin):
    list_display = ["id", "robot", "task", "split", "status", "outcome", "steps", "intervention_count", "started_at"]
    list_filter = ["status", "split", "outcome", "task", "robot"]
    search_fields = ["id", "prompt"]
    date_hierarchy = "started_at"
    list_select_related = ["robot", "task"]
    inlines = [SegmentInline]


@admin.register(AuditEvent)
class AuditEventAdmin(ReadOnlyAdmin):
    list_display = ["at", "actor_name", "action", "robot", "detail"]
    list_filter = ["action"]
    search_fields = ["actor_name", "action"]


@admin.register(ControlLease)
class ControlLeaseAdmin(ReadOnlyAdmin):
    """Takeover leases: written by the console socket (robots/control.py), read-only here."""

    list_display = ["pk", "robot", "operator_name", "reason", "forced", "started_at", "ended_at", "end_reason"]
    list_filter = ["end_reason", "forced", "robot"]
    search_fields = ["operator_name", "reason"]
    list_select_related = ["robot"]
    exclude = ["channel_name"]
