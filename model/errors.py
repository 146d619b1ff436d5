"""Errors the model package raises for bad checkpoints and bad inputs."""

from __future__ import annotations


class OmnivoxError(Exception):
    """Base class: every error here carries a message a user can act on."""


class CheckpointError(OmnivoxError):
    """A checkpoint file is missing or malformed; the message names the file."""


class InputError(OmnivoxError, ValueError):
    """A user input (audio, text, task) cannot be used; the message says why."""
