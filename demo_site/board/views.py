from django.contrib import messages
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_POST

import djstm

from . import state


def _wants_json(request: HttpRequest) -> bool:
    return "application/json" in request.headers.get("Accept", "")


@require_GET
def board(request: HttpRequest) -> HttpResponse:
    context = {"board": djstm.atomically(state.snapshot), "celebrate_every": state.CELEBRATE_EVERY}
    return render(request, "board/board.html", context)


@require_POST
def click(request: HttpRequest) -> HttpResponse:
    djstm.atomically(state.click)
    if _wants_json(request):
        return JsonResponse(djstm.atomically(state.snapshot))
    return redirect("board")


@require_POST
def post_note(request: HttpRequest) -> HttpResponse:
    try:
        djstm.atomically(state.post_note, request.POST.get("text", ""))
    except ValueError as error:
        if _wants_json(request):
            return JsonResponse({"error": str(error)}, status=400)
        messages.error(request, str(error))
        return redirect("board")
    if _wants_json(request):
        return JsonResponse(djstm.atomically(state.snapshot))
    return redirect("board")
