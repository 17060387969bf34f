"""A role change takes effect at once on every path: leases of a user who may no longer operate end, and the user's
open console sockets re-read the role and close their video sessions (the robots trusted the old role for data
channel e-stops). Connected in RobotsConfig.ready; fires for every way a role changes (robots/roles.py set_role,
the Django admin's group and staff checkboxes, deactivation)."""

from __future__ import annotations

import logging

from django.contrib.auth import get_user_model
from django.db import transaction
from django.db.models.signals import m2m_changed, post_save

from . import control, events, roles

log = logging.getLogger(__name__)


def role_may_have_changed(user) -> None:
    """After the commit: end the user's leases if they may no longer operate, and tell their console sockets."""

    def apply():
        fresh = get_user_model().objects.filter(pk=user.pk).first()
        if fresh is None or not roles.can_operate(fresh):
            ended = control.end_leases_for_user(user)
            if ended:
                log.warning("user %s may no longer operate: %d lease(s) ended", user.get_username(), ended)
        events.sends_on_commit([(events.user_group(user.pk), {"type": events.ROLE_CHANGED})])

    transaction.on_commit(apply, robust=True)


def _groups_changed(sender, instance, action, reverse, pk_set, **kwargs):
    if action not in ("post_add", "post_remove", "post_clear"):
        return
    users = [instance] if not reverse else list(get_user_model().objects.filter(pk__in=pk_set or ()))
    for user in users:
        role_may_have_changed(user)


def _user_saved(sender, instance, created, update_fields=None, **kwargs):
    if created:
        return
    if update_fields is not None and not {"is_staff", "is_superuser", "is_active"} & set(update_fields):
        return  # last_login and the like
    role_may_have_changed(instance)


def connect() -> None:
    user_model = get_user_model()
    m2m_changed.connect(_groups_changed, sender=user_model.groups.through, dispatch_uid="sop-role-groups")
    post_save.connect(_user_saved, sender=user_model, dispatch_uid="sop-role-user")
