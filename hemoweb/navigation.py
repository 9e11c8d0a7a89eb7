"""The areas of hemoweb, shown on the start page and in the top bar (only those that are installed)."""

from django.urls import NoReverseMatch, reverse

from apps.accounts.roles import is_curator, is_lab_staff

MODES = (
    ("Classification", "Upload cell images, classify them down the tree, verify and count.", "analysis:home"),
    ("Detection", "Find and count cells on whole smear images, then classify the white cells.", "detection:home"),
    ("Explanation", "See which pixels made the network decide, for any classified cell.", "explain:home"),
    ("Training", "Train a classifier for every node of the tree and compare architectures.", "training:home"),
    ("Sites", "Each lab set-up, its model set, verification studies and quality control over time.", "sites:home"),
    ("Data", "Browse the cell-type tree and the image datasets.", "cells:datasets"),
)


def mode_links() -> list[dict]:
    links = []
    for title, text, url_name in MODES:
        try:
            links.append({"title": title, "text": text, "url": reverse(url_name)})
        except NoReverseMatch:
            continue
    return links


def navigation(request) -> dict:
    """Template context: the installed areas and the user's roles."""
    user = getattr(request, "user", None)
    signed_in = user is not None and user.is_authenticated
    return {
        "nav_links": mode_links() if signed_in else [],
        "is_curator": signed_in and is_curator(user),
        "is_lab_staff": signed_in and is_lab_staff(user),
    }
