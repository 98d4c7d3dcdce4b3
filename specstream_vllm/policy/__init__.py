"""The draft policy: how many tokens each request drafts every step, and from which source.

Host arithmetic in numpy and Python (arrays.py says why), no vLLM: the proposer feeds it what it observes and asks it to plan
the stream pass and to choose the drafts. The objective is tokens per second of the whole
step, from measured step costs and calibrated acceptance; speculation is off where it
cannot pay.

Modules, one job each (each imports only modules listed above it):

* ``arrays``      the host arrays the policy computes with (numpy).
* ``config``      PolicyConfig: the proposer's settings and the tuned constants.
* ``decisions``   Candidates, Plan, Choice, STREAMS: what proposer and policy exchange.
* ``stats``       PolicyStats: counters for reports, how a step is counted.
* ``costs``       StepCosts: verification and draft-pass seconds per batch size and draft
                  count (measured cells, a linear fit elsewhere).
* ``calibration`` Calibration: raw stream probabilities and match confidences corrected
                  online from their own acceptance, per position and bin.
* ``guard``       RealizedGuard: raises the bar where drafting steps realized less than
                  steps without drafts, per batch-size bucket.
* ``budget``      MatchBudget: pauses match lookups where they cost more than they saved.
* ``selection``   the step's arithmetic: likeliest slots first, best draft count.
* ``schedule``    PassSchedule: when the stream pass runs, probes while it does not.
* ``passes``      PassChooser: fused or separate stream pass per batch-size bucket
                  (``draft_pass: auto``), the cheaper one measured.
* ``device_cut``  the per-request cut an accelerator applies to the streams' drafts
                  without reading them back, from the calibration and costs of past steps.
* ``policy``      DraftPolicy: composes the above; ``plan`` before the pass, ``decide``
                  after it (or ``after_device_step`` a step later, when the device cut),
                  ``continue_chain`` between chain passes, ``observe_*``.
"""
from .config import MODES, PolicyConfig
from .decisions import STREAMS, Candidates, Choice, Plan
from .device_cut import CutInputs, cut_inputs, device_lengths
from .passes import PassChooser
from .policy import DraftPolicy

__all__ = ["MODES", "PolicyConfig", "STREAMS", "Candidates", "Choice", "Plan", "DraftPolicy",
           "PassChooser", "CutInputs", "cut_inputs", "device_lengths"]
