"""The embedded shapes world: vocabulary, specs, prompt grammar, renderer, suites and ShapesEval.

Public API::

    from t2ialign.world import parse, to_prompt, render, check, suite, perturbations
    spec = parse("two blue circles on a black background")
    image = render(spec, seed=0)              # (32, 32, 3) uint8
    check(image, spec).correct                # True
"""

from t2ialign.world.checker import CheckResult, Detection, check, detect
from t2ialign.world.grammar import PromptError, parse, to_prompt
from t2ialign.world.scene import Scene, random_spec, render, render_scene, sample_scene
from t2ialign.world.spec import ObjectSpec, Spec, SpecError
from t2ialign.world.suites import is_unseen, perturbations, split_of, suite
from t2ialign.world.vocab import (
    BACKGROUNDS,
    COLORS,
    COUNT_WORDS,
    RELATIONS,
    SHAPES,
    TASKS,
    vocabulary,
)

__all__ = [
    "BACKGROUNDS",
    "COLORS",
    "COUNT_WORDS",
    "RELATIONS",
    "SHAPES",
    "TASKS",
    "CheckResult",
    "Detection",
    "ObjectSpec",
    "PromptError",
    "Scene",
    "Spec",
    "SpecError",
    "check",
    "detect",
    "is_unseen",
    "parse",
    "perturbations",
    "random_spec",
    "render",
    "render_scene",
    "sample_scene",
    "split_of",
    "suite",
    "to_prompt",
    "vocabulary",
]
