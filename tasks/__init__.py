"""SeqIO task and mixture registrations (installed as `recjax.tasks`).

Only registrations live here; the logic they use is in `recjax.data`.
"""
