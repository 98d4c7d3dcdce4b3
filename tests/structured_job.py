"""Structured outputs (JSON schema, regex, choice) in one engine, with or without
speculation: greedy and sampled answers, their validity, and the spec-decode counters.
Run by tests/test_structured_output.py through ``tests.stat_sampling.run_engine``."""
from __future__ import annotations

import json
import re

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer"},
        "city": {"type": "string", "enum": ["Paris", "Tokyo", "Lima", "Oslo"]},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
PHONE = r"\(\d{3}\) \d{3}-\d{4}"
CHOICES = ["positive", "negative", "neutral"]
CASES = {  # name -> (user prompt, structured outputs constraint)
    "json": ("Describe a person as JSON with a name, an age and a city.",
             {"json": SCHEMA, "disable_any_whitespace": True}),
    "regex": ("Write a US phone number.", {"regex": PHONE}),
    "choice": ("Is the sentiment of 'I really love this phone' positive, negative or neutral?",
               {"choice": CHOICES}),
}
MAX_TOKENS = 64


def valid(case: str, text: str) -> bool:
    """Whether ``text`` satisfies the constraint of ``case``."""
    if case == "json":
        import jsonschema
        try:
            jsonschema.validate(json.loads(text), SCHEMA)
        except (ValueError, jsonschema.ValidationError):
            return False
        return True
    if case == "regex":
        return re.fullmatch(PHONE, text) is not None
    return text in CHOICES


def run_job(job: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    from tests.stat_sampling import spec_counts
    llm = LLM(model=job["model"], dtype="float32", enforce_eager=True, max_model_len=512,
              seed=0, speculative_config=job.get("spec"), disable_log_stats=False,
              max_num_seqs=16)
    tok = llm.get_tokenizer()
    out: dict = {}
    for case, (prompt, constraint) in CASES.items():
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
        so = StructuredOutputsParams(**constraint)
        greedy = llm.generate([text], SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS,
                                                     structured_outputs=so), use_tqdm=False)[0]
        sampled = llm.generate(
            [text] * job["samples"],
            [SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, seed=100 + i,
                            structured_outputs=StructuredOutputsParams(**constraint))
             for i in range(job["samples"])], use_tqdm=False)
        out[case] = {
            "greedy": {"tokens": list(greedy.outputs[0].token_ids), "text": greedy.outputs[0].text,
                       "finish": greedy.outputs[0].finish_reason},
            "sampled": [{"text": r.outputs[0].text, "finish": r.outputs[0].finish_reason}
                        for r in sampled],
        }
    return {"cases": out, "spec_decode": spec_counts(llm) if job.get("spec") else None}

