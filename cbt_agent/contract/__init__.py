"""The wire contract of the CBT task API, in one place: request and reply models (validation,
serialization, the OpenAPI components, the reference client's parsing), ZStack's dates, uuids,
error codes, statuses, defaults and queryable fields.

Pure: depends on pydantic, `cbt_agent.errors` and `cbt_agent.model` only (no web framework, no
engine), so the API, the client and the tests all read the same definitions.
"""
