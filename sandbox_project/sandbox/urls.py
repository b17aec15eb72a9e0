"""The admin (with django-rq's dashboard inside it) and one page to enqueue more work."""

from django.contrib import admin
from django.urls import path
from gallery import views

urlpatterns = [
    path("", views.home, name="home"),
    path("admin/", admin.site.urls),
]
