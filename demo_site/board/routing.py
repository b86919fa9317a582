from django.urls import path

from djstm.consumers import DVarConsumer

from .consumers import BoardConsumer

websocket_urlpatterns = [
    path("ws/board/", BoardConsumer.as_asgi()),
    path("ws/djstm/", DVarConsumer.as_asgi()),  # live DVar values for live.js (the banner)
]
