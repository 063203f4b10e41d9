"""Small workflows shared by the API and CLI tests."""

GREET = """\
name: greet
version: 2
description: two echoes in a row
input_schema:
  type: object
  required: [name]
  properties:
    name: {type: string}
steps:
  - id: hello
    task: echo
    input: {greeting: "hello {{ input.name }}"}
  - id: shout
    task: echo
    input: {loud: "{{ steps.hello.output.greeting | upper }}"}
"""

APPROVAL = """\
name: approval
steps:
  - id: prepare
    task: echo
    input: {ready: true}
  - id: gate
    wait_for_signal: {signal: approve}
  - id: done
    task: echo
    input: {approved: "{{ steps.gate.output }}"}
"""
