"""Shared by the API and the workers: settings, storage, the job record store. None of it imports torch."""
