"""The ``/mezo/*`` routes, one module per resource: jobs (``/step``, ``/jobs/*``), the served weights
(``/weights``, ``/reset``, ``/save``) and evaluation (``/eval``, ``/diagnose``)."""

from . import evaluation, jobs, weights

ROUTERS = (jobs.router, weights.router, evaluation.router)
