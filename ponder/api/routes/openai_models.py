"""/v1/models (OpenAI's shape): the model this deployment serves."""

from __future__ import annotations

from fastapi import APIRouter

from ponder.api.deps import CurrentKey, SettingsDep
from ponder.api.errors import BadRequestRoute
from ponder.service.openai import models
from ponder.service.openai.chat_schemas import ModelCard, ModelList

router = APIRouter(prefix="/v1/models", tags=["openai"], route_class=BadRequestRoute)


@router.get("", response_model=ModelList)
def list_models(key: CurrentKey, settings: SettingsDep) -> ModelList:
    """The served model (PONDER_MODEL), the one every job and chat completion runs on."""
    return models.model_list(settings)


# `:path`: a model named by its path (PONDER_MODEL=/models/r1) or an org/name id has slashes.
@router.get("/{model_id:path}", response_model=ModelCard)
def retrieve_model(model_id: str, key: CurrentKey, settings: SettingsDep) -> ModelCard:
    """One model; 404 `model_not_found` for any other id."""
    return models.model_card(settings, model_id)
