"""The Celery app. Workers: ``celery -A sop_web worker -B`` (``manage.py demo`` starts one)."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "sop_web.settings")

app = Celery("sop_web")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
