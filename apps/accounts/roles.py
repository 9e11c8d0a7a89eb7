"""The roles of hemoweb and the checks that pages, the API and the admin share."""

from django.contrib.auth.decorators import user_passes_test
from rest_framework.permissions import BasePermission

LAB_STAFF = "Lab staff"
CURATOR = "Curator"
SUPERVISOR = "Supervisor"  # senior lab staff: the second sign-off of runs over a site's blast or unfamiliar limit


def is_lab_staff(user) -> bool:
    """Lab staff use the app: classify, explain, detect and verify. Curators, supervisors and superusers may too."""
    return user.is_authenticated and (
        user.is_superuser or user.groups.filter(name__in=[LAB_STAFF, CURATOR, SUPERVISOR]).exists()
    )


def is_supervisor(user) -> bool:
    """Supervisors see every run and give the second sign-off where a site asks for one."""
    return user.is_authenticated and (user.is_superuser or user.groups.filter(name=SUPERVISOR).exists())


def is_curator(user) -> bool:
    """Curators manage the tree, datasets, models and training."""
    return user.is_authenticated and (user.is_superuser or user.groups.filter(name=CURATOR).exists())


lab_staff_required = user_passes_test(is_lab_staff)
curator_required = user_passes_test(is_curator)


class IsLabStaff(BasePermission):
    message = "This needs the Lab staff or Curator role."

    def has_permission(self, request, view) -> bool:
        return is_lab_staff(request.user)


class IsCurator(BasePermission):
    message = "This needs the Curator role."

    def has_permission(self, request, view) -> bool:
        return is_curator(request.user)


class CuratorWritesLabStaffReads(BasePermission):
    """Reads for lab staff, writes for curators."""

    message = "Reading needs the Lab staff role; changing needs the Curator role."

    def has_permission(self, request, view) -> bool:
        if request.method in ("GET", "HEAD", "OPTIONS"):
            return is_lab_staff(request.user)
        return is_curator(request.user)
