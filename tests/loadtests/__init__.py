"""Tests of the load-test harness (loadtests/)."""
