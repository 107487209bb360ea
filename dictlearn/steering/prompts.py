"""Topic-neutral prompts: steering is calibrated on, and measured by, what the model writes after them.

`dictlearn steer --kl` calibrates on a few of them beside the user's prompt; the steering evaluation
(`dictlearn.eval.steering`) generates its steered continuations from the first `n_prompts`.
"""

from __future__ import annotations

NEUTRAL_PROMPTS: tuple[str, ...] = (
    "I think that", "The best thing about", "Yesterday, I", "Here is what happened:", "In my opinion,",
    "She looked at the", "When I was young,", "The most important thing is", "Let me tell you about",
    "It was a", "We decided to", "There is something", "My favourite", "He said that", "This morning",
    "The problem with", "After a long day,", "Everyone knows that", "One of the", "I have always",
    "The story begins", "Last week,", "People often", "It is clear that", "At the end of the day,",
    "They told me", "I remember when", "The reason is", "If you want to", "Today we", "What I like most is",
    "The new",
)
