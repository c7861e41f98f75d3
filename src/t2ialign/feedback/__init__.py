"""Human feedback collection (stage 1 of Lee et al. 2023): the feedback store, a web labelling app,
simulated raters, agreement statistics, exports and imports.

::

    from t2ialign.feedback import FeedbackStore
    store = FeedbackStore.open("proj")
    for r in store.labelled_images(simulated=False):   # image, prompt, spec, task, split, label, ...
        ...
    for p in store.pairs():                             # img_w, img_l, tie, prompt, ...
        ...

Modules: ``store`` (the project folder and its SQLite database), ``records`` (reading labels and
pairs back), ``labelling`` (annotators, labels, assignment, undo), ``schema`` (tables, version,
migrations), ``simulate`` (checker-based raters), ``stats`` (kappas, project statistics), ``export``
(Parquet, Hugging Face datasets, Pick-a-Pic), ``labelstudio`` (import), ``app`` (the FastAPI
labelling app). A guide for people running labelling sessions: docs/labelling.md.
"""

from t2ialign.feedback.labelling import Conflict, LabelError, NotFound
from t2ialign.feedback.store import FeedbackStore, LabelRecord, PairRecord

__all__ = ["Conflict", "FeedbackStore", "LabelError", "LabelRecord", "NotFound", "PairRecord"]
