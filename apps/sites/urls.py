from django.urls import path

from . import views

app_name = "sites"
urlpatterns = [
    path("", views.home, name="home"),
    path("<int:pk>/", views.site_detail, name="site"),
    path("<int:pk>/verify/", views.start_study, name="start-study"),
    path("<int:pk>/use-set/", views.use_set, name="use-set"),
    path("<int:pk>/quality-control/", views.quality_control, name="quality-control"),
    path("studies/<int:pk>/", views.study, name="study"),
    path("studies/<int:pk>/report/", views.report, name="report"),
]
