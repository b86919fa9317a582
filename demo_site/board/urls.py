from django.urls import path

from . import views

urlpatterns = [
    path("", views.board, name="board"),
    path("click", views.click, name="click"),
    path("notes", views.post_note, name="post_note"),
]
