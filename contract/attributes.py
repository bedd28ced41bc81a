"""The attribute names the app writes and the sidecar reads: the app-to-sidecar contract.

Both sides import these constants instead of spelling the strings, so a rename is one
edit and a typo is an ImportError rather than a silently empty metric label. A test
(tests/contract/test_attributes.py) fails when a module in instrumentation/, sidecar/
or redaction/ spells one of these names as a literal.

Who writes and who reads:

=================================  =========================================================
request identity                   app middleware -> every span and log record of a request;
                                   read by audit, syslog, the trace viewer
``sampling.force_keep``            app (``X-Debug-Trace``) -> tail sampling's debug policy
``sampling.policy``                tail sampling -> kept spans (which policy kept the trace)
``ml.model.*``                     torch / TorchServe / GenAI instrumentation -> span metrics'
                                   ``model_id``/``model_version`` labels, audit, drift
``ml.*`` forward facts, payloads   torch instrumentation, replay capture -> audit records
``ml.drift.*``                     drift summaries (metrics) -> the drift processor
``gen_ai.*``                       GenAI instrumentation -> span metrics (model fallback),
                                   audit, redaction (measurement keys that look like secrets)
``service.name``                   the app's OTel resource -> every sidecar label and record
=================================  =========================================================
"""

from __future__ import annotations

# --- request identity (instrumentation._context) ----------------------------------------------
REQUEST_ID = "request.id"
USER_ID = "user.id"
#: Semantic tags (``set_tags(intent="classify")``) travel as ``tag.<name>`` span attributes
#: and as W3C baggage entries of the same name.
TAG_PREFIX = "tag."
#: The tag (a key of the request's tags, so ``tag.intent`` on spans) that says what a request
#: was for; audit records and drift/cost summaries group by it.
INTENT_TAG = "intent"

# --- sampling ---------------------------------------------------------------------------------
#: true on every span of a request the app wants kept whatever the sampling policies say.
SAMPLING_FORCE_KEEP = "sampling.force_keep"
#: Set by tail sampling on the spans of a trace it keeps: the name of the deciding policy.
SAMPLING_POLICY = "sampling.policy"

# --- the model serving the request ------------------------------------------------------------
ML_MODEL_ID = "ml.model.id"
ML_MODEL_VERSION = "ml.model.version"
ML_BATCH_SIZE = "ml.batch_size"
ML_INPUT_SHAPES = "ml.input.shapes"
ML_INPUT_DTYPES = "ml.input.dtypes"
ML_OUTPUT_SHAPES = "ml.output.shapes"
ML_DEVICE = "ml.device"
#: Replayable tensor payloads, written only when the app enables capture.
ML_INPUT_PAYLOAD = "ml.input.payload"
ML_OUTPUT_PAYLOAD = "ml.output.payload"

# --- drift summaries (instrumentation.drift -> the sidecar's drift processor) -----------------
#: Histogram of per-forward summary statistics; a data point per model version and feature.
ML_DRIFT_VALUE = "ml.drift.value"
#: Counter of categorical features (shape, dtype, label); also the attribute naming the category.
ML_DRIFT_CATEGORY = "ml.drift.category"
ML_DRIFT_FEATURE = "ml.drift.feature"
ML_DRIFT_SIGN = "ml.drift.sign"

# --- generative AI (OpenTelemetry GenAI semantic conventions) ---------------------------------
GEN_AI_OPERATION_NAME = "gen_ai.operation.name"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_REQUEST_TEMPERATURE = "gen_ai.request.temperature"
GEN_AI_REQUEST_TOP_P = "gen_ai.request.top_p"
GEN_AI_REQUEST_TOP_K = "gen_ai.request.top_k"
GEN_AI_REQUEST_SEED = "gen_ai.request.seed"
GEN_AI_REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
GEN_AI_USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
GEN_AI_RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
GEN_AI_TOKEN_TYPE = "gen_ai.token.type"
GEN_AI_PROMPT = "gen_ai.prompt"
GEN_AI_COMPLETION = "gen_ai.completion"
#: Measurements (seconds) whose names end in "token", so the built-in ``token`` key rule
#: would take them for secrets; redaction leaves them readable.
GEN_AI_SERVER_TIME_TO_FIRST_TOKEN = "gen_ai.server.time_to_first_token"
GEN_AI_SERVER_TIME_PER_OUTPUT_TOKEN = "gen_ai.server.time_per_output_token"
GEN_AI_CLIENT_TIME_TO_FIRST_TOKEN = "gen_ai.client.time_to_first_token"
GEN_AI_CLIENT_TIME_PER_OUTPUT_TOKEN = "gen_ai.client.time_per_output_token"

# --- the resource -----------------------------------------------------------------------------
SERVICE_NAME = "service.name"

#: Every attribute name above (the dotted ones; ``INTENT_TAG`` is a tag key), for tests and tools.
ALL: frozenset[str] = frozenset(
    v for k, v in dict(globals()).items() if k.isupper() and isinstance(v, str) and "." in v)
