from django.apps import AppConfig
from django.db.models.signals import post_migrate, post_save


class LisConfig(AppConfig):
    name = "apps.lis"
    label = "lis"
    verbose_name = "Lab information system"

    def ready(self) -> None:
        from .outbox import queue_on_sign_off
        from .tasks import ensure_schedule

        # Signed-off runs go into the LIS outbox without the sign-off code knowing about the LIS.
        post_save.connect(queue_on_sign_off, sender="analysis.ClassificationRun", dispatch_uid="lis-queue-on-sign-off")
        # After every migrate (and a test's flush), like permissions: the sender's django-q2 schedule exists.
        post_migrate.connect(ensure_schedule, sender=self, dispatch_uid="lis-send-schedule")
