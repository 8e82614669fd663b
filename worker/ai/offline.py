"""The `offline` provider: answers every task from templates, with no network and no key.

It reads the inputs the prompt carries and answers with JSON text, so its answers go through
the same parsing and validation as a real model's. It is the default provider, which is what
lets the whole pipeline run on a fresh machine.
"""

from __future__ import annotations

import asyncio
from typing import Any

from worker.ai.base import AIReply, AIRequest, Notify, Usage
from worker.ai.parsing import extract_input
from worker.local import offline_edits
from worker.local.offline_site import offline_code, offline_content, offline_plan
from worker.models import Brief, SiteContent, SitePlan


def _tokens(text: str) -> int:
    # The usual rule of thumb for English text: about four characters a token.
    return max(1, len(text) // 4)


class OfflineProvider:
    def __init__(self, name: str = "offline", model: str = "offline-templates-1", latency_s: float = 0.0) -> None:
        self.name = name
        self.model = model
        self.latency_s = latency_s

    async def complete(self, request: AIRequest, *, notify: Notify | None = None) -> AIReply:
        if self.latency_s:
            # Lets the demo and benchmarks behave like a model that takes its time.
            await asyncio.sleep(self.latency_s)
        inputs: dict[str, Any] = extract_input(request.prompt)
        edited = offline_edits.answer(inputs)
        if edited is not None:
            answer = edited
        elif request.task == "planning":
            brief = Brief.model_validate(inputs["brief"])
            answer = offline_plan(brief).model_dump_json()
        elif request.task == "content":
            answer = offline_content(
                Brief.model_validate(inputs["brief"]), SitePlan.model_validate(inputs["plan"])
            ).model_dump_json()
        else:
            plan = SitePlan.model_validate(inputs["plan"])
            answer = offline_code(plan, SiteContent.model_validate(inputs["content"])).model_dump_json()
        usage = Usage(_tokens(request.system) + _tokens(request.prompt), _tokens(answer), 1)
        return AIReply(text=answer, usage=usage, provider=self.name, model=self.model)

    async def aclose(self) -> None:
        return None
