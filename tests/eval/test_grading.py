"""The graders against a table of answer pairs a careful grader must get right.

Cases math-verify itself gets wrong are kept in the table as ``xfail`` with the reason, not dropped."""
import pytest

from rast_kernels.eval import grade, grade_detail
from rast_kernels.eval import grading

XF = pytest.mark.xfail

# (completion, gold, expected)
MATH_CASES = [
    # fractions, decimals, \dfrac, \frac12
    (r"so the answer is $\boxed{\frac{1}{2}}$", r"\frac{1}{2}", True),
    (r"\boxed{0.5}", r"\frac{1}{2}", True),
    (r"\boxed{\dfrac{3}{4}}", r"\frac34", True),
    (r"\boxed{\frac12}", "0.5", True),
    (r"\boxed{\tfrac{2}{4}}", r"\frac{1}{2}", True),
    (r"\boxed{0.25}", r"\frac{1}{3}", False),
    (r"\boxed{\frac{2}{3}}", r"\frac{3}{2}", False),
    # units, degrees, percent, dollars
    (r"\boxed{90^\circ}", "90", True),
    (r"\boxed{90}", r"90^\circ", True),
    (r"\boxed{5\text{ cm}}", "5", True),
    (r"\boxed{\$5}", "5", True),
    (r"\boxed{12\text{ inches}}", "13", False),
    # equations vs values
    (r"\boxed{x = 3}", "3", True),
    (r"\boxed{3}", "x=3", True),
    (r"\boxed{x = 4}", "3", False),
    # intervals and sets
    (r"\boxed{(1, 2]}", "(1,2]", True),
    (r"\boxed{[1, 2]}", "(1,2)", False),
    (r"\boxed{(-\infty, 3)}", r"(-\infty,3)", True),
    (r"\boxed{\{1, 2, 3\}}", r"\{3,2,1\}", True),
    (r"\boxed{\{1, 2\}}", r"\{1,2,3\}", False),
    (r"\boxed{1, 2}", "2, 1", True),
    # signs
    (r"\boxed{-7}", "-7", True),
    (r"\boxed{7}", "-7", False),
    (r"\boxed{-\frac{1}{2}}", "-0.5", True),
    # thousands separators
    (r"\boxed{1,234}", "1234", True),
    (r"\boxed{1{,}234}", "1234", True),
    (r"\boxed{1234}", "1,234", True),
    # \text{} answers, multiple choice
    (r"\boxed{\text{(B)}}", r"\text{(B)}", True),
    (r"\boxed{\text{B}}", "B", True),
    (r"\boxed{\text{(C)}}", r"\text{(B)}", False),
    # several boxed answers: the last one counts
    (r"first \boxed{2} then, correcting myself, \boxed{3}", "3", True),
    (r"first \boxed{2} then, correcting myself, \boxed{3}", "2", False),
    # no boxed answer: an anchored plain answer, or nothing
    ("The answer is 42.", "42", True),
    ("no answer here at all", "42", False),
    ("", "42", False),
    # symbolic equivalence
    (r"\boxed{2\sqrt{2}}", r"\sqrt{8}", True),
    (r"\boxed{\pi/2}", r"\frac{\pi}{2}", True),
    (r"\boxed{x^2+2x+1}", "(x+1)^2", True),
    (r"\boxed{\sqrt{2}/2}", r"\frac{1}{\sqrt{2}}", True),
    (r"\boxed{x^2-1}", "(x+1)^2", False),
    (r"\boxed{3\sqrt{3}}", r"\sqrt{27}", True),
    # percent: math-verify treats "10\%" as 10 when the gold is 10 (MATH writes both spellings)
    (r"\boxed{10\%}", "10", True),
    # a gold already anchored is taken as is
    (r"\boxed{7}", r"$7$", True),
    (r"\boxed{7}", r"\boxed{7}", True),
    (r"\boxed{\frac{1}{2}}", r"1/2\text{ of the cake}", True),
    (r"\boxed{\text{Monday}}", r"\text{monday}", True),
    (r"\boxed{x \in [1,2]}", "[1,2]", True),
    (r"\boxed{1.5 \times 10^{3}}", "1500", True),
    (r"\boxed{2^{10}}", "1024", True),
    (r"\boxed{\infty}", r"\infty", True),
    (r"\boxed{a=2, b=3}", "b=3, a=2", True),
    (r"\boxed{3, 5}", "5", False),
    (r"\boxed{0.333}", r"\frac13", False),  # 6-digit rounding: 0.333 is not 1/3
    # cases math-verify gets wrong (documented, not hidden; strict, so a fixed math-verify shows up here)
    pytest.param(r"\boxed{1\,000}", "1000", True,
                 marks=XF(reason="math-verify reads a thin-space thousands separator as a product (1*0)", strict=True)),
    pytest.param(r"\boxed{1 000}", "1000", True,
                 marks=XF(reason="math-verify reads a space thousands separator as a product (1*0)", strict=True)),
    pytest.param(r"\boxed{\frac{\sqrt{3}}{2}}", r"\sin 60^\circ", True,
                 marks=XF(reason="math-verify drops ^\\circ, so the gold becomes sin(60 radians)", strict=True)),
    pytest.param(r"\boxed{\dfrac{1}{2}\%}", "0.005", True,
                 marks=XF(reason="math-verify does not parse a percent sign after a fraction", strict=True)),
]

GSM8K_CASES = [
    ("She has 3 + 4 = 7 apples.\n#### 7", "Natalia sold ... 48+24 = <<48+24=72>>72 clips.\n#### 72", False),
    ("48 + 24 = 72 clips in all.\n#### 72", "Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72", True),
    ("So the total is $1,234.", "#### 1234", True),
    ("The answer is 18.00 dollars", "#### 18", True),
    ("I get -5 degrees", "#### -5", True),
    ("I get 5 degrees", "#### -5", False),
    (r"so \boxed{12} eggs, 3 left over", "#### 12", True),
    ("first 10, then 20", "#### 10", False),  # the last number counts
    ("no numbers", "#### 10", False),
    ("#### 0.5", "#### .5", True),
    ("It costs 1,000,000 in total", "#### 1000000", True),
]

TOY_CASES = [
    ("S1123345556678899O", "O", True),
    ("S1123345556678899O", "E", False),
    ("E", "E", True),
    ("", "E", False),
    ("O", "1", True),
    ("O", "Q1000000000000000=", True),
    ("E", "Q1000000000000000=", False),
]


@pytest.mark.parametrize("completion,gold,expected", MATH_CASES)
def test_math_table(completion, gold, expected):
    pytest.importorskip("math_verify")
    assert grade(completion, gold, "math") is expected


@pytest.mark.parametrize("completion,gold,expected", GSM8K_CASES)
def test_gsm8k_table(completion, gold, expected):
    assert grade(completion, gold, "gsm8k") is expected


@pytest.mark.parametrize("completion,gold,expected", TOY_CASES)
def test_toy_table(completion, gold, expected):
    assert grade(completion, gold, "toy") is expected


def test_extracted_keys():
    # the maj@k keys: one spelling per value for gsm8k, the answer letter for toy, None when nothing is there
    assert grade_detail("18.00", "#### 18", "gsm8k") == (True, "18")
    assert grade_detail("so 1,200 in total", "#### 1200", "gsm8k") == (True, "1200")
    assert grade_detail("nothing", "#### 1", "gsm8k") == (False, None)
    assert grade_detail("S1O", "O", "toy") == (True, "O")
    assert grade_detail("S11", "O", "toy") == (False, None)


def test_math_extracted_key():
    pytest.importorskip("math_verify")
    ok, key = grade_detail(r"\boxed{\frac{2}{4}}", "0.5", "math")
    assert ok and key == "1/2"
    assert grade_detail("nothing", "1", "math") == (False, None)


def test_pathological_expression_is_cut_by_the_deadline():
    # math-verify's own timeouts are >= 1 s inside the worker; a 0.3 s deadline must win, kill the worker,
    # count the answer wrong, and leave the grader working (a fresh worker) for the next call
    pytest.importorskip("math_verify")
    assert grade(r"\boxed{9^{9^{9^{9}}}}", "1", "math", timeout=0.3) is False
    assert grading._WORKER.proc is None
    assert grade(r"\boxed{2}", "2", "math") is True


def test_bad_arguments():
    with pytest.raises(ValueError, match="kind"):
        grade("1", "1", "nope")
    with pytest.raises(TypeError, match="completion"):
        grade(None, "1", "gsm8k")
    with pytest.raises(TypeError, match="gold"):
        grade("1", 1, "gsm8k")
    with pytest.raises(ValueError, match="timeout"):
        grade("1", "1", "gsm8k", timeout=0)
    with pytest.raises(ValueError, match="gold"):
        grade("E", "maybe", "toy")
