"""/v1/models: the one model a deployment serves (PONDER_MODEL), which every job runs on."""

from __future__ import annotations

from ponder.service.errors import NotFound
from ponder.service.openai.chat_schemas import ModelCard, ModelList
from ponder.service.prompts import served_model
from ponder.service.settings import Settings


def model_list(settings: Settings) -> ModelList:
    """The served model: one per deployment (PONDER_MODEL), which every job runs on."""
    model = served_model(settings.model, settings.engine.max_model_len)
    return ModelList(data=[ModelCard(id=settings.model, created=model.created)])


def model_card(settings: Settings, model_id: str) -> ModelCard:
    for card in model_list(settings).data:
        if card.id == model_id:
            return card
    raise _model_not_found(model_id, settings)


def _model_not_found(model_id: str, settings: Settings) -> NotFound:
    message = f"the model {model_id!r} does not exist (this deployment serves {settings.model!r})"
    return NotFound(message, "model", code="model_not_found")


def check_model(model: str, settings: Settings) -> None:
    if model != settings.model:
        raise _model_not_found(model, settings)
