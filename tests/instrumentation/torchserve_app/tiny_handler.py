"""The TorchServe handler of the end-to-end test: what a user writes on top of our handler base.

It configures the instrumentation itself (endpoint from ``TS_E2E_OTLP_ENDPOINT``), then
lets :class:`~instrumentation.torchserve.TracingHandler` load the eager model, and
overrides ``preprocess``/``postprocess`` the way TorchServe handlers usually do; the
overrides still become stage spans and their log lines carry the request's trace id.
"""

import logging
import os

import torch

import instrumentation
from instrumentation.torchserve import TracingHandler

log = logging.getLogger("tiny_handler")


class TinyHandler(TracingHandler):
    def initialize(self, context):
        instrumentation.configure(service_name="torchserve-e2e", endpoint=os.environ["TS_E2E_OTLP_ENDPOINT"],
                                  metrics_enabled=False)
        super().initialize(context)
        log.info("tiny model loaded")

    def preprocess(self, data):
        rows = [row.get("body") if row.get("body") is not None else row.get("data") for row in data]
        log.info("preprocess %d rows", len(rows))
        return torch.tensor(rows, dtype=torch.float32)

    def postprocess(self, data):
        log.info("postprocess %s", tuple(data.shape))
        return data.tolist()
