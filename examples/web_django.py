"""A single-file Django app offloading CPU-heavy work to a gaspar daemon.

A sync view calls a module-level :class:`gaspar.client.Client`, which is thread-safe and
shared by every request thread (runserver, or gunicorn's gthread workers). An ``async def``
view would ``await`` a :class:`gaspar.aio.Client` instead (under an ASGI server). Run::

    pip install django   # and gaspar 2 itself: README.rst, Installation
    gaspar serve examples.hashing:Hasher --bind 127.0.0.1:10123
    GASPAR_ADDR=127.0.0.1:10123 python examples/web_django.py runserver 127.0.0.1:8000 --noreload
    # in production: gunicorn -k gthread --threads 4 -b 127.0.0.1:8000 examples.web_django:application
    curl 'http://127.0.0.1:8000/hash?data=hello'   # CPU-heavy: runs in a gaspar worker
    curl 'http://127.0.0.1:8000/ping'              # cheap: answered in the request thread
"""

from __future__ import annotations

import os
import sys

from django.conf import settings

settings.configure(
    DEBUG=False,
    SECRET_KEY=os.environ.get("DJANGO_SECRET_KEY", "only-for-the-example"),
    ALLOWED_HOSTS=["127.0.0.1", "localhost"],
    ROOT_URLCONF=__name__,
    MIDDLEWARE=[],
    INSTALLED_APPS=[],
)

from django.core.wsgi import get_wsgi_application  # noqa: E402
from django.http import HttpRequest, HttpResponse  # noqa: E402
from django.urls import path  # noqa: E402

import gaspar  # noqa: E402
from gaspar.client import Client  # noqa: E402

GASPAR_ADDR = os.environ.get("GASPAR_ADDR", "127.0.0.1:10123")
client = Client(GASPAR_ADDR, timeout=10)


def hash_view(request: HttpRequest) -> HttpResponse:
    try:
        reply = client.request(request.GET.get("data", ""))
    except (gaspar.ServerUnavailable, gaspar.ConnectFailed) as exc:  # overloaded, stopping or down
        return HttpResponse(str(exc), status=503, content_type="text/plain")
    return HttpResponse(reply, content_type="text/plain")


def ping_view(request: HttpRequest) -> HttpResponse:
    return HttpResponse(b"pong", content_type="text/plain")


urlpatterns = [path("hash", hash_view), path("ping", ping_view)]
application = get_wsgi_application()

if __name__ == "__main__":
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
