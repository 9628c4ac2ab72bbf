"""The study: the paper's measurements on real prompts (`specert eval`), drafter selection (`specert select`), the
report, prompt sets, `specert certify` on saved logits and `specert bench`. Built on :mod:`specert.theory`,
:mod:`specert.decoding` and :mod:`specert.drafters`."""
