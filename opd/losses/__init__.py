"""Loss maths of opd: plain-torch reference implementations of the kernel functions (issue 3)."""
