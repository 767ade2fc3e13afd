"""What clients send to and get from the two Triton models of an exported checkpoint NAME.

NAME_score (Python backend, dynamic batching, max_batch_size = the export's max_batch):
    in   IMAGES        uint8 N x C x H x W, values in [0, levels) (grey models too: C = 1; one
                       layout, so generic clients such as perf_analyzer, which send every
                       declared input, make valid requests)
         LABELS        int64 N x 1, class-conditional models only (required there)
    out  NLL_NATS      float32 N x 1, -log p(image) in nats
         BITS_PER_DIM  float32 N x 1, NLL_NATS / (C * H * W * ln 2)
         PIXEL_NLL     float32 N x C x H x W, nats of each sub-pixel given those before it
                       (sums to NLL_NATS); sent only to requests that name it among their
                       requested outputs

NAME_ood (Python backend, dynamic batching; only where the model was exported with a
background model): out-of-distribution scores, composed over NAME_score and the background's
scorer BACKGROUND_score by business-logic scripting (runtime/ood.py says what each means).
    in   IMAGES        as NAME_score (no LABELS: a class-conditional model is scored by its
                       marginal p(x) over the classes)
    out  NLL_NATS      float32 N x 1, -log p(x) under the model
         BACKGROUND_NLL_NATS  float32 N x 1, -log p(x) under the background model
         LLR           float32 N x 1, NLL_NATS - BACKGROUND_NLL_NATS (higher: more out of distribution)
         COMPLEXITY    float32 N x 1, NLL in bits minus the bits of a lossless compression
         OOD           bool N x 1, the score named in the model's threshold (LLR) above it; the
                       threshold, calibrated on in-distribution validation images at a chosen
                       false-positive rate, is in the model's config parameters

NAME_sample (Python backend, decoupled = streaming, stateful: every request carries a sequence
id, Triton's correlation id; max_batch_size 0). All inputs are optional and hold one value
unless said otherwise; what each may hold is runtime/request.py's (one rule per field):
  START request (sequence_start=True):
         BATCH_SIZE    int32, images in this sequence (default: KNOWN's, else 1; at most max_batch)
         TEMPERATURE   float64, 0 = greedy, else finite in [1e-6, 5] (default 1)
         SEED          uint64 (default: a random one); the same seed gives the same images as
                       export.cells.sample_cached / training.sample.sample_reference
         LABELS        int64 1 or B class ids (class-conditional models only, required there)
         KNOWN         uint8 B x C x R x W: the first R rows of every image are kept as given
                       (completion, or resuming a stream after R received rows)
         MAX_ROWS      int32, rows to stream for this request (default: all of them)
         ROWS_PER_RESPONSE  int32 >= 1, at most this many rows in one response (default: no
                       limit; 1 = strict per-row pacing, one response per row, as before
                       coalescing); any request of a sequence may carry it, for its own rows
  later requests of the same sequence: MAX_ROWS and ROWS_PER_RESPONSE only (default: all
  remaining rows); sequence_end=True frees the sequence once the request's rows are sent
  (MAX_ROWS 0 = cancel).
  Responses, in order, each carrying R >= 1 consecutive rows of one stage (known rows included):
         STAGE         int32 [1], the stage (0; multi-scale: 0 the small image, 1 the full one)
         ROW_INDEX     int32 [1], the first row's index within its stage
         ROW_COUNT     int32 [1], R, the rows in this response
         ROW           uint8 B x C x R x W_stage, the rows' values (KNOWN's layout: concatenate
                       the responses' ROW along axis 2 to get the images)
         ROW_LOGPROB   float32 B x R, log p of each row (multi-scale full stage: grid pixels
                       left out)
         ACTIVE        int32 [1], sequences the sampler holds (after the last row's step)
         CALL_BATCH    int32 R, per row: images in the cell call that made it (all sequences in it)
  Row coalescing: R is 1 while the server keeps up with its sending, so the first row is never
  held back; when a sequence's rows wait to be sent (the server is busy, up to the sampler's
  16 rows ahead), they go out together, paying the per-response cost (backend IPC, gRPC, the
  client's parsing) once. Triton fixes each output's rank, so a single row is R = 1, not a
  tensor of lower rank.
  then an empty response flagged final (tritonclient: enable_empty_final_response=True).
  A sequence is freed when its image is complete, at sequence_end, on an error, when the
  client cancels, or after the idle timeout without a request; errors arrive per request.
  Overload: the sampler holds at most its live-images budget (the config's max_live_images
  parameter, or what sampler_memory_mb holds; server/engine/admission.py; shown on the metrics
  endpoint as pixelrnn_sampler_images_budget and in the server log). A START
  whose BATCH_SIZE images do not fit gets at once an error (UNAVAILABLE) whose message starts
  with OVERLOADED and names the budget and the current load: retry later. With the config's
  admission_queue N > 0 (server/repository.py --admission-queue N --admission-wait-ms MS) it
  waits instead, first come first served, while fewer than N wait: it starts as soon as it
  fits, else gets that OVERLOADED error after admission_wait_ms (a full queue refuses at once);
  later requests of a waiting sequence wait with it. Metrics: pixelrnn_sampler_waiting_starts
  and pixelrnn_sampler_events_total{event=admitted|queued|overloaded}.
  The live sequences go on; when more images want rows than one cell call takes, each call
  goes to the least served sequences counted in image-rows, so a small sequence is not held
  back by big ones (server/engine/worker.py).
  Stuck sends: a response send that has not returned for the config's stuck_send_s seconds
  (default 10; 0: off) marks the sampler unhealthy (metrics endpoint:
  pixelrnn_sampler_healthy 0, pixelrnn_sampler_events_total{event="stuck_sends"}); the other
  sequences on that sender thread get the rows already made, then an error starting with
  UNHEALTHY: resume them elsewhere from the received rows (KNOWN, same seed); new sequences go
  to a fresh sender thread. python -m pixelrnn.server.cluster restarts a replica that reports it.
"""
from __future__ import annotations

from pixelrnn.runtime import tensor_names as tn

SCORE_SUFFIX = "_score"
SAMPLE_SUFFIX = "_sample"
DETECT_SUFFIX = "_ood"

IMAGES, LABELS, NLL_NATS, BITS_PER_DIM, PIXEL_NLL = tn.IMAGES, tn.LABELS, tn.NLL_NATS, tn.BITS_PER_DIM, tn.PIXEL_NLL

BATCH_SIZE = "BATCH_SIZE"
TEMPERATURE = tn.TEMPERATURE
SEED = "SEED"
KNOWN = "KNOWN"
MAX_ROWS = "MAX_ROWS"
ROWS_PER_RESPONSE = "ROWS_PER_RESPONSE"
START_ONLY = (BATCH_SIZE, TEMPERATURE, SEED, LABELS, KNOWN)

STAGE = "STAGE"
ROW_INDEX = "ROW_INDEX"
ROW_COUNT = "ROW_COUNT"
ROW = tn.ROW
ROW_LOGPROB = "ROW_LOGPROB"
ACTIVE = "ACTIVE"
CALL_BATCH = "CALL_BATCH"
OVERLOADED = "overloaded:"  # how the error of a START over the live-images budget begins
UNHEALTHY = "unhealthy:"  # how the error of a sequence ended because a response send got stuck begins


def score_model(name: str) -> str:
    return name + SCORE_SUFFIX


def sample_model(name: str) -> str:
    return name + SAMPLE_SUFFIX


def detect_model(name: str) -> str:
    return name + DETECT_SUFFIX


BACKGROUND_NLL_NATS = "BACKGROUND_NLL_NATS"
LLR = "LLR"
COMPLEXITY = "COMPLEXITY"
OOD = "OOD"
