# Shortcuts; the README's two commands need none of them.
PYTEST = MAILFLOWR_TEST_POSTGRES_URL=$${MAILFLOWR_TEST_POSTGRES_URL-postgresql+psycopg://postgres@127.0.0.1:5432/test} .venv/bin/pytest

.PHONY: test fuzz
test:
	$(PYTEST)

# A long fuzzing run: 5,000 examples per generator through the real listener and pipeline.
fuzz:
	$(PYTEST) tests/test_fuzz.py --hypothesis-profile=long --timeout=0
