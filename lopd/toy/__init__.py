"""The bundled toy world: a task with a verifier, a character tokenizer and two small Qwen2 models.

Nothing else in lopd depends on it except defaults: every stage takes any Hugging Face model path.
"""
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
TOKENIZER_DIR = ASSETS / "tokenizer"
TEACHER_DIR = ASSETS / "teacher"
STUDENT_BASE_DIR = ASSETS / "student_base"
TEACHER_B_DIR = ASSETS / "teacher_b"  # a second words teacher (another seed): the teacher-consistency experiment
CALC_TEACHER_DIR = ASSETS / "calc_teacher"  # the calculator (tool-use) world's teacher: lopd.toy.calc
