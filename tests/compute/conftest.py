"""Fixtures of the compute tests: the integration tests' moto S3 server (a default datastore that is
an object store, for steps on Ray nodes of another machine)."""

from tests.integration.conftest import moto_s3  # noqa: F401
