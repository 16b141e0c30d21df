"""The tutor's system prompts as token prefixes, for the server to compute into the prefix cache
at start-up: every tutor conversation begins with one of them, so the first question of the day
pays only for itself. The tokens are those of the chat template's rendering of the system turn
alone, cut to where it agrees with a whole conversation's rendering (a template may join turns
in ways that tokenise differently at the seam)."""
from __future__ import annotations

from vidya.tutor import prompts


def system_prefixes(engine) -> list[list[int]]:
    """One token list per (subject, class) the page offers; [] when the model has no chat template."""
    if not getattr(engine.tokenizer, "chat_template", None):
        return []
    # tokenised as the server tokenises a chat request's rendered text
    encode = lambda text: engine.tokenizer(text, add_special_tokens=False).input_ids
    out = []
    for subject in prompts.subjects():
        for klass in prompts.classes():
            system = {"role": "system", "content": prompts.system_prompt(subject, klass)}
            alone = encode(engine.apply_chat_template([system], add_generation_prompt=False))
            whole = encode(engine.apply_chat_template([system, {"role": "user", "content": "नमस्ते"}]))
            n = next((i for i, (a, b) in enumerate(zip(alone, whole)) if a != b), min(len(alone), len(whole)))
            if n:
                out.append(alone[:n])
    return out
