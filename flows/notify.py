"""Nobody watches a 4-hour run: a Prefect automation POSTs to a webhook (Slack-style JSON, `text` and
fields) when a flow run of `speedrun` or `stage` ends Failed or Crashed (or TimedOut, a kind of Failed).

    NANOCHAT_WEBHOOK_URL=https://hooks.slack.com/... PREFECT_API_URL=http://127.0.0.1:4200/api python -m flows.notify
    make deploy                     the same, at the end, against the server of `make server`
    python -m flows.notify --remove removes the automation and its webhook block

Run again, it updates both in place (one automation and one Webhook block, both nanochat-run-failed).
Without NANOCHAT_WEBHOOK_URL it changes nothing and says so: a `make deploy` from a shell that lacks
the variable leaves an earlier setup working. The URL lives in the block as a secret.

One POST per failure: the trigger matches state changes of flow runs (task runs are not matched, so
a failing stage task and its flow are one failure), by state type, and fires once per event. Prefect's
own retries pass through AwaitingRetry, never Failed, so a retried run notifies once, when it gives up.
"""

import argparse
import os
import sys
from urllib.parse import urlsplit

from prefect.automations import CallWebhook, EventTrigger, Posture
from prefect.blocks.webhook import Webhook
from prefect.client.orchestration import get_client
from prefect.events.schemas.automations import AutomationCore
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL

from flows.speedrun import one_stage, speedrun

NAME = "nanochat-run-failed"
URL_VARIABLE = "NANOCHAT_WEBHOOK_URL"

# The POST's body, rendered by the server's actions service (Jinja, sandboxed; `flow_run` and `flow`
# are read from the API). Every value goes through tojson, so quotes and newlines in a state message
# stay valid JSON; a parameter the run did not get is null.
PAYLOAD = """\
{%- set p = flow_run.parameters -%}
{%- set url = flow_run | ui_url -%}
{
  "text": {{ ("nanochat: " ~ flow.name ~ (" " ~ p.name if p.name else "") ~ " run '" ~ flow_run.name ~ "'"
              ~ (" of " ~ p.run_name if p.run_name else "") ~ " is " ~ flow_run.state.name ~ ": "
              ~ flow_run.state.message | trim ~ (" " ~ url if url else "")) | tojson }},
  "flow": {{ flow.name | tojson }},
  "flow_run": {{ flow_run.name | tojson }},
  "flow_run_id": {{ flow_run.id | string | tojson }},
  "state": {{ flow_run.state.name | tojson }},
  "message": {{ flow_run.state.message | tojson }},
  "stage": {{ p.name | default(none) | tojson }},
  "run_name": {{ p.run_name | default(none) | tojson }},
  "preset": {{ p.preset | default(none) | tojson }},
  "url": {{ url | default(none) | tojson }}
}"""


def automation(block_id):
    """The automation: a webhook call for each flow run of our flows that enters a failed state."""
    return AutomationCore(
        name=NAME,
        description=f"POST to ${URL_VARIABLE} when a {speedrun.name} or {one_stage.name} flow run fails (flows/notify.py)",
        enabled=True,
        trigger=EventTrigger(
            expect={"prefect.flow-run.*"},
            # by type, not name: Failed, Crashed and TimedOut; never Retrying or AwaitingRetry
            match={"prefect.resource.id": "prefect.flow-run.*", "prefect.state-type": ["FAILED", "CRASHED"]},
            match_related={"prefect.resource.role": "flow", "prefect.resource.name": [speedrun.name, one_stage.name]},
            for_each={"prefect.resource.id"},
            posture=Posture.Reactive,
            threshold=1,
        ),
        actions=[CallWebhook(block_document_id=block_id, payload=PAYLOAD)],
    )


def install(url):
    """Saves the webhook block and creates or updates the automation; returns (automation id, verb)."""
    block = Webhook(method="POST", url=url, headers={"Content-Type": "application/json"})
    block_id = block.save(NAME, overwrite=True)
    with get_client(sync_client=True) as client:
        first, *extra = client.read_automations_by_name(NAME) or [None]
        for duplicate in extra:  # e.g. two deploys that raced: leave one
            client.delete_automation(duplicate.id)
        if first is None:
            return client.create_automation(automation(block_id)), "created"
        client.update_automation(first.id, automation(block_id))
        return first.id, "updated"


def remove():
    """Deletes the automation(s) and the webhook block; returns how many automations there were."""
    with get_client(sync_client=True) as client:
        found = client.read_automations_by_name(NAME)
        for existing in found:
            client.delete_automation(existing.id)
        try:
            client.delete_block_document(client.read_block_document_by_name(NAME, "webhook").id)
        except ObjectNotFound:
            pass
    return len(found)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m flows.notify", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--remove", action="store_true", help="delete the automation and the webhook block")
    args = p.parse_args(argv)
    api = PREFECT_API_URL.value()
    if not api:  # without a server Prefect would start a temporary one, and the automation would vanish with it
        sys.exit("flows.notify: set PREFECT_API_URL to the Prefect server's API (make deploy does)")
    if args.remove:
        print(f"flows.notify: removed {remove()} automation(s) {NAME} from {api}")
        return
    url = os.environ.get(URL_VARIABLE, "")
    if not url:
        print(f"flows.notify: {URL_VARIABLE} is not set; failed runs notify nobody new (automation {NAME} unchanged)")
        return
    if urlsplit(url).scheme not in ("http", "https"):
        sys.exit(f"flows.notify: {URL_VARIABLE} must be an http(s) URL")
    automation_id, verb = install(url)
    print(f"flows.notify: {verb} automation {NAME} ({automation_id}) on {api}: failed runs POST to ${URL_VARIABLE}")


if __name__ == "__main__":
    main()
