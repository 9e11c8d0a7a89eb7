"""Send the LIS outbox: `manage.py lis_send --once` for one pass, or without it a loop (a lab that runs
no django-q2 cluster, or wants the sender as its own service)."""

import logging
import time

from django.core.management.base import BaseCommand, CommandError
from django.db import DatabaseError, close_old_connections

from apps.lis.tasks import send_due_task

log = logging.getLogger(__name__)


class Command(BaseCommand):
    help = "Send the signed-off results waiting in the LIS outbox (one pass with --once, else every --interval s)."

    def add_arguments(self, parser):
        parser.add_argument("--once", action="store_true", help="One pass, then exit.")
        parser.add_argument("--interval", type=float, default=15.0,
                            help="Seconds between passes of the loop (default 15).")

    def handle(self, *args, once: bool, interval: float, **options):
        if interval <= 0:
            raise CommandError("--interval must be more than 0 seconds.")
        if once:
            self.stdout.write(send_due_task())
            return
        while True:
            try:
                outcome = send_due_task()
            except DatabaseError as error:  # the database restarting: the outbox is in it, try again later
                log.error("LIS sender: database unavailable (%s); next pass in %g s", type(error).__name__, interval)
                close_old_connections()
            else:
                if outcome != "nothing due":
                    self.stdout.write(outcome)
            time.sleep(interval)
