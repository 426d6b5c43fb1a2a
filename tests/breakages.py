"""Breaks each promise the suite holds, on purpose, and shows its tests failing: a test that passes
whatever the code does proves nothing. Each breakage is one small edit of the product code, made in a
copy of this working tree (the repository is never touched); the tests that hold that promise then
run in the copy, and each breakage must make them fail.

    .venv/bin/python -m tests.breakages              # every breakage (several minutes)
    .venv/bin/python -m tests.breakages sandbox-net  # the ones named
    .venv/bin/python -m tests.breakages --list

Exit status 0 when every breakage was caught; otherwise the ones that were not are named.
"""

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.support.deployed import working_tree_diff

REPO = Path(__file__).resolve().parent.parent
NATIVE = "rustbpe/_native"


@dataclasses.dataclass(frozen=True)
class Breakage:
    name: str
    promise: str  # what the docs promise, broken here
    path: str  # the file edited, relative to the repository
    old: str  # text that must occur in it exactly once
    new: str
    tests: tuple  # pytest arguments that must then fail


BREAKAGES = [
    # the sandbox, as root and as a normal user
    Breakage("sandbox-network", "a sandboxed program reaches no network", "nanochat/sandbox.py",
             "CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID", "CLONE_NEWNS | CLONE_NEWPID", ("tests/test_execution.py",)),
    Breakage("sandbox-view", "a sandboxed program cannot read its user's private files", "nanochat/sandbox.py",
             "    enter_view(work)\n    if uid == 0:", "    if uid == 0:", ("tests/test_execution.py",)),
    # cache invalidation
    Breakage("cache-upstream", "a changed upstream stage runs its dependents again", "flows/stages.py",
             '"inputs": {name: upstream_sha256(summary_uri(name, spec)) for name in stage.needs},', '"inputs": {},',
             ("tests/test_cache.py",)),
    Breakage("cache-named", "a file an option names, changed under the same name, runs its stage again", "flows/stages.py",
             '"named": named_contents(config),', '"named": {},', ("tests/test_cache.py",)),
    Breakage("cache-held", "a cached result counts only while the run holds its outputs", "flows/stages.py",
             "if storage.exists(record) and not holds(stage, spec, record):", "if False:", ("tests/test_cache.py",)),
    # machine independence
    Breakage("cpu-kernels-unused", "kernel tests assert the kernel actually ran", "nanochat/cpu/kernels.py",
             "return LIBRARY is not None and x.device.type", "return False and x.device.type", ("tests/test_cpu_kernels.py",)),
    Breakage("panel-weights-cut", "PanelLinear rounds its weights to bf16 to nearest, not by cutting them short",
             "nanochat/cpu/kernels.py", "weight.detach().to(torch.bfloat16).view(",
             "(weight.detach().view(torch.int32) >> 16).to(torch.int16).view(torch.bfloat16).view(",
             ("tests/test_linears.py::test_forms_equal_nn_linear", "tests/test_linears.py::test_panel_matmul_equals_float64_matmul")),
    Breakage("panel-weights-fp32", "PanelLinear holds its weights in bf16: half the bytes", "nanochat/cpu/kernels.py",
             "weight.detach().to(torch.bfloat16).view(", "weight.detach().view(",
             ("tests/test_linears.py::test_panel_linear_holds_its_weight_in_half_the_bytes",)),
    Breakage("cpu-switch-ignored", "NANOCHAT_CPU_FASTPATHS=0 runs inference on torch's ops", "nanochat/cpu/__init__.py",
             "    if not enabled():", "    if False:", ("tests/test_cpu_door.py", "tests/test_linears.py")),
    # exact resume, the whole state
    Breakage("resume-rng", "a run killed and resumed ends with the same checkpoint, RNG state included",
             "nanochat/training.py", "        if self.rng is not None:", "        if False:",
             ("tests/test_base_train.py", "-k", "kill_9")),
    Breakage("resume-other-model", "a checkpoint of another model config is refused with a message",
             "nanochat/training.py", "if differences := config_differences(saved, dataclasses.asdict(model.config)):",
             "if differences := None:", ("tests/test_base_train.py", "-k", "another_model")),
    Breakage("resume-grad-scaler", "fp16 training resumes its loss scaler's state", "nanochat/training.py",
             'if self.scaler is not None and "grad_scaler" in meta:', "if False:", ("tests/test_base_train.py", "-k", "fp16")),
    # the 2026 recipe
    Breakage("recipe-last-window", "the last layer always attends to the whole context", "nanochat/gpt.py",
             "return windows[:-1] + [None]", "return windows", ("tests/test_model_options.py",)),
    Breakage("recipe-smear-copy", "a copied cache row carries smear's previous-token embeddings", "nanochat/engine.py",
             "            self.embeddings[dst, :n] = self.embeddings[src, :n]", "            pass",
             ("tests/test_model_options.py",)),
    Breakage("recipe-muon-plus", "2026 Muon halves a rank-1 distance in 50 steps", "nanochat/optim.py",
             "    if muon_plus:\n        update = renormalize(update)", "    if False:\n        update = renormalize(update)",
             ("tests/test_optim.py",)),
    Breakage("recipe-old-checkpoint", "a 2-process checkpoint from before the 2026 recipe resumes as classic",
             "nanochat/optim.py", 'if group["kind"] == "adamw" and saved is not None and saved.shape == p.shape != shape:',
             "if False:", ("tests/test_base_train.py", "-k", "before_the_2026")),
    Breakage("recipe-skip-rewires", "a run that skips mid_train trains chat_sft on base_train's model",
             "nanochat/stages/_finetune.py", "stage.upstream_checkpoint(args.run, args.from_stage)",
             "stage.upstream_checkpoint(args.run, 'mid_train')", ("tests/test_chat_train.py", "-k", "warm_start")),
    # serving: the limits table, the web UI, the CPU switch
    Breakage("serve-max-messages", "--max-messages refuses a request with more messages", "nanochat/serve/app.py",
             "    if len(body.messages) > limits.max_messages:", "    if False:",
             ("tests/test_serve_security.py", "-k", "limits_per_key")),
    Breakage("serve-retry-after", "a rate-limited client's Retry-After is the wait until its next request may go",
             "nanochat/serve/guard.py", "return (1 - tokens) / self.rate", "return 1",
             ("tests/test_serve_security.py", "-k", "limits_per_key")),
    Breakage("serve-leaving-client", "a non-streaming client that disconnects cancels its request", "nanochat/serve/worker.py",
             "if not done.done() and await http_request.is_disconnected():", "if False:",
             ("tests/test_serve_security.py", "-k", "non_streaming_client_that_leaves")),
    Breakage("serve-fastpaths-value", "serve refuses a bad NANOCHAT_CPU_FASTPATHS at start, in one line",
             "nanochat/serve/__init__.py", "        check_switch()\n", "        pass\n",
             ("tests/test_serve_security.py", "-k", "fastpaths_switch")),
    Breakage("serve-switch-ignored", "a server with NANOCHAT_CPU_FASTPATHS=0 serves on torch's ops", "nanochat/cpu/__init__.py",
             "    if not enabled():", "    if False:", ("tests/test_completions.py", "-k", "echo_logprobs and torch")),
    Breakage("ui-stop", "the web UI's Stop ends the answer and cancels the request", "nanochat/serve/ui.html",
             'stop.addEventListener("click", () => controller && controller.abort());', 'stop.addEventListener("click", () => {});',
             ("tests/test_serve.py", "-k", "stop_cancels")),
    Breakage("ui-new-chat", "the web UI's New chat starts an empty conversation", "nanochat/serve/ui.html",
             "messages = []; log.innerHTML = \"\"; busy(false);", "busy(false);", ("tests/test_serve.py", "-k", "web_ui_in_headless")),
    # the node's slot and the speedrun command
    Breakage("slot-exclusive", "one GPU job at a time per node: the node's slot has one holder", "flows/slots.py",
             "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)", "fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)",
             ("tests/test_slots.py::test_one_holder_at_a_time_and_a_killed_one_frees_the_slot_once_its_stage_ends",)),
    Breakage("slot-inherited", "a flow killed outright leaves the slot to its running stage", "flows/stages.py",
             "keep_fds=() if slot is None else (slot,))", "keep_fds=())",
             ("tests/test_slots.py::test_a_flow_killed_outright_leaves_the_slot_to_its_stage_until_the_stage_ends",)),
    Breakage("speedrun-ctrl-c", "Ctrl-C of python -m flows.speedrun ends its stages and itself", "flows/speedrun.py",
             "    signal.signal(signal.SIGINT, stop_on_interrupt)\n", "",
             ("tests/test_slots.py::test_ctrl_c_of_make_speedrun_ends_it_and_its_stages_and_frees_the_slot",)),
    Breakage("speedrun-override-option", "an override of an option its stage lacks is refused before anything runs",
             "flows/speedrun.py", "        if unknown := sorted(set(options) - known):", "        if unknown := []:",
             ("tests/test_flow_options.py::test_an_unknown_preset_or_override_stage_is_refused_before_anything_runs",)),
    Breakage("speedrun-storage", "storage the run cannot reach is one line before anything runs", "flows/speedrun.py",
             "    except Exception as e:  # noqa: BLE001 - whatever the filesystem raises", "    except ImportError as e:  # noqa: BLE001",
             ("tests/test_flow_options.py::test_storage_it_cannot_reach_is_one_line_before_anything_runs",)),
    Breakage("flow-clears-other-work", "a stage the flow last ran for other work starts from nothing, not its old checkpoints",
             "flows/stages.py", 'if storage.exists(record) and storage.read_json(record).get("work") != digest:', "if False:",
             ("tests/test_flow_options.py::test_the_flow_clears_a_stage_folder_of_other_work_before_it_runs",)),
    Breakage("skip-held", "a skip of a stage the run holds is refused", "flows/speedrun.py", "    if held:\n", "    if False:\n",
             ("tests/test_flow_options.py::test_a_skip_that_leaves_out_a_finished_stage_of_the_run_is_refused",)),
    # a finished training stage run again
    Breakage("same-work-execution", "a finished stage run again with other options of how it runs is the same work",
             "nanochat/training.py", "ignored = training_options.EXECUTION_OPTIONS | (", "ignored = set() | (",
             ("tests/test_base_train.py::test_a_finished_stage_run_again_by_hand_with_other_options_is_refused",)),
    Breakage("same-work-other-options", "a finished stage run again by hand with other options stops, naming them",
             "nanochat/training.py", "if before[k] != now[k] and k not in ignored]", "if False]",
             ("tests/test_base_train.py::test_a_finished_stage_run_again_by_hand_with_other_options_is_refused",)),
    Breakage("resume-wall-time", "a training stage's wall time counts its earlier attempts", "nanochat/training.py",
             '            self.earlier_wall_s = meta.get("wall_time_s", 0.0)', "            pass",
             ("tests/test_base_train.py", "-k", "kill_9")),
    Breakage("tokenizer-replaced", "a model refuses a tokenizer replaced since it trained", "nanochat/checkpoint.py",
             "if trained_with and hashlib.sha256", "if False and hashlib.sha256",
             ("tests/test_checkpoint.py::test_a_model_refuses_a_tokenizer_replaced_since_it_trained",)),
    Breakage("sft-one-pass", "chat_sft --num-steps -1 trains one pass over the mixture", "nanochat/stages/_finetune.py",
             "mode=args.rows, epochs=1))", "mode=args.rows, epochs=2))",
             ("tests/test_chat_train.py::test_sft_trains_one_pass_over_a_mixture_with_mmlu_at_a_fraction_of_the_rates",)),
    # CPU training speed
    Breakage("polar-dtype-cpu", "the polar iterations run in bf16 only on CPUs that multiply it in hardware", "nanochat/optim.py",
             "return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32", "return torch.bfloat16",
             ("tests/test_optim.py", "-k", "polar_iterations_run_in_bf16_only")),
    Breakage("keep-freed-memory", "CPU stages keep the memory they free (no page faults every step)", "nanochat/common.py",
             '        if device_type == "cpu":\n            keep_freed_memory()', '        if False:\n            keep_freed_memory()',
             ("tests/test_allocator.py",)),
    # chat, export, serve
    Breakage("chat-too-long-one-shot", "nanochat chat -p with a prompt over the context is one line, exit 1", "nanochat/chat.py",
             '        except ContextTooLong as e:\n            print(f"nanochat chat: {e}"',
             '        except ImportError as e:\n            print(f"nanochat chat: {e}"',
             ("tests/test_serve.py::test_chat_cli_one_shot_and_interactive",)),
    Breakage("chat-too-long-session", "an interactive chat whose conversation outgrows the context goes on", "nanochat/chat.py",
             "        except ContextTooLong as e:  # the conversation", "        except ImportError as e:  # the conversation",
             ("tests/test_serve.py::test_chat_cli_one_shot_and_interactive",)),
    Breakage("export-max-tokens", "an export's max_new_tokens is at most the model's context", "nanochat/export.py",
             'generation["max_tokens"] = min(generation["max_tokens"], config.sequence_len)',
             'generation["max_tokens"] = generation["max_tokens"]',
             ("tests/test_hf_export.py::test_the_directory_is_transformers_own_type_or_carries_its_code",)),
    Breakage("serve-port-in-use", "serve on a port in use is one line, before it says where it serves", "nanochat/serve/__init__.py",
             "        raise SystemExit(f\"nanochat serve: cannot listen on {host}:{port}: {e.strerror or e}\") from None",
             "        raise", ("tests/test_serve.py::test_a_port_in_use_is_one_line_before_serve_says_it_serves",)),
    Breakage("serve-startup-failure", "a model that cannot load ends the server with one line", "nanochat/serve/ops.py",
             "isinstance(error, LOAD_ERRORS)", "isinstance(error, KeyboardInterrupt)",
             ("tests/test_serve.py::test_a_corrupt_checkpoint_is_one_line_from_serve_and_chat",)),
    Breakage("serve-sigterm-whole", "on SIGTERM, answers that would outlast --shutdown-timeout end whole a little before it",
             "nanochat/serve/ops.py", "            self.finish_by(time.monotonic() + timeout - min(SHUTDOWN_MARGIN, timeout / 2))",
             "            pass", ("tests/test_serve.py::test_sigterm_ends_what_would_outlast_the_shutdown_deadline_whole",)),
    Breakage("import-greedy", "an imported generation_config with do_sample false decodes greedy", "nanochat/hf.py",
             '    if theirs.get("do_sample") is False:', "    if False:",
             ("tests/test_hf_import.py::test_a_greedy_generation_config_imports_greedy",)),
    Breakage("letters-alike", "a categorical task whose letters begin with the same token is refused, naming the example",
             "nanochat/evaluation/chatcore.py", "    if len(set(ids)) < len(ids):", "    if False:",
             ("tests/test_custom_task.py", "-k", "letters_that_cannot_work")),
    # the OpenAI-compatible API: logprobs, samples, usage, limits, keys, the tokenizer endpoints
    Breakage("echo-offset-split-char", "an echoed prompt ending inside a character: the completion's text_offset follows its U+FFFD",
             "nanochat/serve/completions.py", '            self.offset += len(self.decoder.decode(b"", final=True))', "            pass",
             ("tests/test_completions.py::test_echo_offsets_when_the_prompt_ends_inside_a_character",)),
    Breakage("completions-choice-index", "with n samples of several prompts, prompt i's sample j is choice i*n + j",
             "nanochat/serve/completions.py", "return prompt * self.n + sample", "return prompt + sample",
             ("tests/test_completions.py::test_token_id_prompts_lists_and_scoring_alone",)),
    Breakage("usage-prompt-once", "usage counts a prompt's tokens once, whatever n is", "nanochat/serve/common.py",
             "prompt_tokens = sum(len(r.prompt_ids) for r in requests)", "prompt_tokens = sum(len(r.prompt_ids) * r.n for r in requests)",
             ("tests/test_completions.py::test_token_id_prompts_lists_and_scoring_alone",)),
    Breakage("serve-seed", "a seeded request samples the same texts again", "nanochat/engine.py",
             "seed = params.seed + index if params.seed is not None else random.getrandbits(63)", "seed = random.getrandbits(63)",
             ("tests/test_completions.py::test_stop_n_seed_and_streaming",)),
    Breakage("serve-stop-excluded", "a stop string ends the answer and is not in its text", "nanochat/engine.py",
             "self.text, self.stopped = self.text[:i], True", "self.text, self.stopped = self.text[:i + len(stop)], True",
             ("tests/test_serve.py::test_n_samples_seed_and_stop",)),
    Breakage("chat-logprobs-off", "a chat request without logprobs gets logprobs null", "nanochat/serve/app.py",
             "logprobs=(body.top_logprobs or 0) if body.logprobs else None)", "logprobs=(body.top_logprobs or 0))",
             ("tests/test_serve.py::test_chat_logprobs_streaming_and_not",)),
    Breakage("serve-max-tokens", "max_tokens over --max-tokens is refused naming the field", "nanochat/serve/common.py",
             "    if max_tokens is not None and max_tokens > limits.max_tokens:", "    if False:",
             ("tests/test_serve_fuzz.py::test_max_tokens_caps_the_models_default",)),
    Breakage("serve-key-scheme", "an API key counts only as Authorization: Bearer", "nanochat/serve/guard.py",
             'digest(token.strip() if scheme.lower() == b"bearer" else b"")', "digest(token.strip())",
             ("tests/test_serve_security.py", "-k", "without_a_valid_key")),
    Breakage("detokenize-range", "/detokenize of an id outside the vocabulary is a 400 naming tokens", "nanochat/serve/completions.py",
             "        if not all(0 <= t < tok.vocab_size for t in body.tokens):", "        if False:",
             ("tests/test_serve_fuzz.py::test_no_server_errors_and_openai_error_bodies",)),
    Breakage("serve-port-zero", "serve --port 0 names the port it took", "nanochat/serve/__init__.py",
             "on http://{host}:{sock.getsockname()[1]}", "on http://{host}:{args.port}",
             ("tests/test_serve_security.py::test_limits_per_key_body_and_request",)),
    # bench/gpu_check.py on a CPU
    Breakage("gpu-check-not-run", "gpu_check: a check the deadline left out fails the run and is named for --only",
             "bench/gpu_check.py", 'again = [row["key"] for row in rows if row["result"] in ("FAIL", "not run")]',
             'again = [row["key"] for row in rows if row["result"] in ("FAIL",)]',
             ("tests/test_gpu_check.py::test_checks_the_deadline_leaves_out_are_named_for_a_second_run",)),
    # pretraining data: ClimbMix, the download stage
    Breakage("climbmix-url", "a ClimbMix shard's URL is at its Hugging Face dataset's root", "nanochat/sources.py",
             "resolve/main/{relpath.split('/', 1)[1]}", "resolve/main/{relpath}",
             ("tests/test_climbmix.py::test_the_registered_facts",)),
    Breakage("download-resume", "a download cut mid-file continues with a Range request", "nanochat/dataset.py",
             '    headers = {"Range": f"bytes={offset}-", **({"If-Range": validator} if validator else {})} if offset else {}',
             "    headers = {}", ("tests/test_download.py::test_a_later_run_resumes_the_partial_file_of_the_same_version_only",)),
    Breakage("download-verify", "download --verify re-hashes cached files and fetches a damaged one again", "nanochat/dataset.py",
             '            if not self.verify or storage.sha256(dest) == entry["sha256"]:', "            if True:",
             ("tests/test_download.py::test_verify_refetches_a_damaged_file_and_a_lost_manifest_costs_no_bytes",)),
    # SFT: best-fit packing, the mixture's epochs, the warm start
    Breakage("best-fit-largest", "best-fit packing takes the largest item that fits", "nanochat/dataloader.py",
             "return self._pop(bisect.bisect_left(self._keys, (self._keys[i][0],)))", "return self._pop(0)",
             ("tests/test_dataloader.py::test_best_fit_buffer_rule",
              "tests/test_dataloader.py::test_pack_places_every_conversation_whole_once")),
    Breakage("mixture-epochs", "a task's weight in a mixture is its epochs", "tasks/mixtures.py",
             "out.append(out[-1] + round(w * len(task)))", "out.append(out[-1] + len(task))",
             ("tests/test_tasks.py::test_sequence_and_mixture",)),
    Breakage("sft-warm-start", "--warm-start-optimizer starts from the upstream stage's optimizer state", "nanochat/stages/_finetune.py",
             "    if state is None and args.warm_start_optimizer:", "    if False:",
             ("tests/test_chat_train.py::test_sft_from_the_base_model_with_identity_conversations_and_warm_start",)),
    # rustbpe as PyPI rustbpe 0.1.0
    Breakage("rustbpe-decode-unknown", "rustbpe's decode of an unknown id raises ValueError", "rustbpe/__init__.py",
             "            if not 0 <= i < self.vocab_size:", "            if i < 0:",
             ("tests/test_rustbpe_train.py::test_pypi_behaviours",)),
    Breakage("rustbpe-custom-pattern", "train_from_iterator splits by a custom pattern", "rustbpe/__init__.py",
             "texts = [c.encode() for text in texts for c in _chunks(compiled, text)]", "texts = [text.encode() for text in texts]",
             ("tests/test_rustbpe_train.py::test_custom_patterns_match_upstream_rustbpe",)),
    # upstream checkpoints: nothing in them runs
    Breakage("upstream-crafted-pickle", "a crafted tokenizer.pkl runs nothing", "nanochat/upstream.py",
             '        raise pickle.UnpicklingError(f"{module}.{name} is not allowed (only tiktoken.core.Encoding is)")',
             "        return super().find_class(module, name)",
             ("tests/test_upstream_import.py::test_a_crafted_tokenizer_pickle_runs_nothing",)),
    Breakage("upstream-weights-only", "crafted upstream weights run nothing (torch.load weights_only)", "nanochat/upstream.py",
             'torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)',
             'torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)',
             ("tests/test_upstream_import.py::test_crafted_weights_run_nothing",)),
    # atomic writes, verified checkpoints
    Breakage("storage-atomic-write", "a write that fails leaves the old file and no partial one", "nanochat/storage.py",
             "            os.fsync(f.fileno())\n        commit(tmp, uri)\n    finally:\n",
             "            os.fsync(f.fileno())\n    finally:\n        commit(tmp, uri)\n",
             ("tests/test_storage.py::test_failed_write_leaves_nothing",)),
    Breakage("checkpoint-verify", "a checkpoint file that does not match its manifest is refused, and resume skips it",
             "nanochat/checkpoint.py", '    if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:',
             "    if False:", ("tests/test_checkpoint.py::test_incomplete_and_corrupt_checkpoints_are_skipped",)),
    # the report card, chat_rl
    Breakage("rl-tool-output", "chat_rl trains only on sampled tokens, not on forced tool output", "nanochat/rollouts.py",
             "        forced = forced and t != output_end", "        forced = forced",
             ("tests/test_chat_rl.py::test_sampled_mask_leaves_out_tool_output",)),
    Breakage("rl-rollouts-autocast", "chat_rl samples under the autocast training uses", "nanochat/rollouts.py",
             "        with self.autocast():\n            completions", "        if True:\n            completions",
             ("tests/test_chat_rl.py::test_metrics_count_the_sampled_tokens_and_rollouts_autocast_as_training",)),
    # more of the API, the download and SFT's warm start
    Breakage("completions-top-has-chosen", "a completions top_logprobs holds the chosen token (k=0: it alone)",
             "nanochat/serve/completions.py", "            top.setdefault(out[\"tokens\"][-1], entry.logprob)\n", "",
             ("tests/test_completions.py::test_token_id_prompts_lists_and_scoring_alone",)),
    Breakage("tokenize-no-special", "/tokenize with add_special_tokens false adds no <|bos|>", "nanochat/serve/completions.py",
             "tokens = encode(tokenizer(), body.prompt, body.add_special_tokens)", "tokens = encode(tokenizer(), body.prompt, True)",
             ("tests/test_completions.py::test_tokenizer_endpoints_as_vllm_serves_them",)),
    Breakage("gpu-check-jsonl", "gpu_check appends each check's JSON line as it ends", "bench/gpu_check.py",
             '                    f.write(json.dumps(row) + "\\n")', "                    pass",
             ("tests/test_gpu_check.py::test_on_a_cpu_a_check_runs_with_what_it_needs_and_reports_each_as_it_ends",)),
    Breakage("download-if-range", "a partial file of another version of the file is never resumed", "nanochat/dataset.py",
             '**({"If-Range": validator} if validator else {})', "**{}",
             ("tests/test_download.py::test_a_later_run_resumes_the_partial_file_of_the_same_version_only",)),
    Breakage("download-shard-check", "a downloaded shard that is not parquet with a text column is refused", "nanochat/dataset.py",
             "            shards.open_shard(uri).close(force=True)", "            pass",
             ("tests/test_download.py::test_bad_shards_in_the_mirror_are_refused",)),
    Breakage("sft-warm-start-own-rates", "a warm start keeps this stage's learning rates", "nanochat/stages/_finetune.py",
             'optimizer.load_state_dict({"state": loaded["state"], "param_groups": groups})', "optimizer.load_state_dict(loaded)",
             ("tests/test_chat_train.py::test_sft_from_the_base_model_with_identity_conversations_and_warm_start",)),
    Breakage("mixture-random-share", "a fractional weight takes a random share of the task, fixed by the seed", "tasks/mixtures.py",
             "sorted(rng.sample(range(n), count % n))", "list(range(count % n))", ("tests/test_tasks.py::test_sequence_and_mixture",)),
    Breakage("report-cost", "the report card's cost of a stage is its wall time at NANOCHAT_HOURLY_USD", "nanochat/report.py",
             "${s['wall_time_s'] / 3600 * usd:.2f}", "${s['wall_time_s'] / 60 * usd:.2f}",
             ("tests/test_report.py::test_each_stage_costs_its_wall_time_at_the_hourly_price",)),
    Breakage("prune-manifest-first", "pruning deletes a checkpoint's manifest first: a prune cut short leaves no complete-looking step",
             "nanochat/checkpoint.py", "        storage.remove(storage.join(uri, MANIFEST))\n", "",
             ("tests/test_checkpoint.py::test_a_prune_cut_short_leaves_no_checkpoint_that_looks_complete",)),
    Breakage("rl-advantage-baseline", "chat_rl's advantages are the rewards less their question's mean", "nanochat/rollouts.py",
             "advantages = torch.tensor([r - mean for r in rewards])", "advantages = torch.tensor([float(r) for r in rewards])",
             ("tests/test_chat_rl.py::test_advantages_are_the_rewards_less_their_questions_mean",)),
    Breakage("engine-samples-share-prefill", "a request's n samples continue its one prefill (its KV rows copied)", "nanochat/engine.py",
             "        self.k[:, dst, :, :n] = self.k[:, src, :, :n]\n", "",
             ("tests/test_engine.py::test_cached_batched_greedy_equals_uncached",)),
    Breakage("import-rotary", "an imported transformers model computes its logits in ours (q/k turned to our rotary)", "nanochat/hf.py",
             "state[key] = flip_qk(key, tensor, config).contiguous().clone()", "state[key] = tensor.contiguous().clone()",
             ("tests/test_hf_import.py::test_a_transformers_model_imports_with_its_logits_and_greedy_tokens",)),
    Breakage("model-qk-scale", "qk_scale scales both queries and keys (the scores by its square)", "nanochat/gpt.py",
             "q, k = q * self.qk_scale, k * self.qk_scale", "q, k = q * self.qk_scale, k",
             ("tests/test_model_options.py::test_each_option_computes_upstreams_formulas",)),
    Breakage("core-mean-loss", "a CORE choice wins by its mean loss per token, not its total", "nanochat/evaluation/core.py",
             "losses[i, start - 1:end - 1].mean().item()", "losses[i, start - 1:end - 1].sum().item()",
             ("tests/test_core_eval.py::test_a_choice_wins_by_its_mean_loss_per_token_not_its_total",)),
    Breakage("gsm8k-first-marker", "GSM8K reads the number after the completion's first ####", "tasks/common.py",
             "    m = FINAL_RE.search(text)\n", "    m = ([None, *FINAL_RE.finditer(text)])[-1]\n",
             ("tests/test_tasks.py::test_gsm8k_number_normalisation",)),
    Breakage("adamw-group-betas", "each AdamW group steps with its own betas (upstream's per-group betas)", "nanochat/optim.py",
             'beta1, beta2 = group["betas"]', "beta1, beta2 = 0.8, 0.95",
             ("tests/test_optim.py::test_groups_and_adamw_equal_upstream_hyperparameters_and_torch_adamw",)),
    Breakage("lr-final-frac", "the warm-down ends at --final-lr-frac of the peak rate", "nanochat/optim.py",
             "    return progress + (1 - progress) * final_lr_frac", "    return progress", ("tests/test_optim.py::test_schedules",)),
    Breakage("momentum-warmdown", "2026 Muon momentum falls from 0.97 to 0.90 over the warm-down", "nanochat/optim.py",
             "return interpolate(0.97, 0.90,", "return interpolate(0.97, 0.97,", ("tests/test_optim.py::test_schedules",)),
    Breakage("x0-lambdas", "--lambdas mixes the input embedding back in at each layer by x0_lambdas", "nanochat/gpt.py",
             "x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0", "x = self.resid_lambdas[i] * x",
             ("tests/test_model_options.py::test_each_option_computes_upstreams_formulas",)),
    Breakage("rope-base", "--rope-base sets the rotary tables' base", "nanochat/gpt.py",
             "c.head_dim, c.rope_base, device=self.cos.device)", "c.head_dim, 10000.0, device=self.cos.device)",
             ("tests/test_model_options.py::test_each_option_computes_upstreams_formulas",)),
    Breakage("init-2026-fc", "init 2026 draws the MLP's c_fc within 0.4 times the bound", "nanochat/gpt.py",
             "fc_bound = 0.4 * bound if modern else bound", "fc_bound = bound", ("tests/test_model_options.py::test_init_2026",)),
    Breakage("loss-mean-ignored", "the mean loss is over the tokens not ignored (-1)", "nanochat/loss.py",
             "return losses.sum() / (targets != -1).sum()", "return losses.sum() / targets.numel()",
             ("tests/test_fused_loss.py::test_loss_ignores_minus_one",)),
    Breakage("cpu-softmax-temperature", "the CPU sampling kernel's weights equal torch's softmax at the temperature",
             "nanochat/cpu/ops.py", "kernels.softmax_weights(rows, 1 / temperature)", "kernels.softmax_weights(rows, temperature)",
             ("tests/test_cpu_kernels.py::test_softmax_weights_equal_torch",)),
    Breakage("schedule-wiring", "a training stage trains under its preset's schedules: LR warm-up", "nanochat/training.py",
             "warmup_steps=args.warmup_steps,", "warmup_steps=0,",
             ("tests/test_base_train.py::test_the_presets_schedules_drive_the_optimizer",)),
    Breakage("schedule-wiring-momentum", "a training stage trains under its preset's schedules: Muon momentum", "nanochat/training.py",
             "muon_momentum(self.step, plan.num_steps, args.momentum_schedule, args.warmdown_ratio)",
             "muon_momentum(self.step, plan.num_steps, \"classic\", args.warmdown_ratio)",
             ("tests/test_base_train.py::test_the_presets_schedules_drive_the_optimizer",)),
    Breakage("schedule-wiring-decay", "a training stage trains under its preset's schedules: weight decay", "nanochat/training.py",
             "weight_decay_multiplier(self.step, plan.num_steps, args.weight_decay_schedule))",
             "weight_decay_multiplier(self.step, plan.num_steps, \"constant\"))",
             ("tests/test_base_train.py::test_the_presets_schedules_drive_the_optimizer",)),
    Breakage("horizon-target-flops", "--target-flops trains for that many FLOPs (steps = FLOPs / (FLOPs per token x batch))",
             "nanochat/stages/base_train.py", "round(args.target_flops / (model.estimate_flops() * batch))",
             "round(args.target_flops / model.estimate_flops())",
             ("tests/test_presets.py::test_a_flops_target_is_the_steps_that_spend_it",)),
    Breakage("redact-secret-env", "the values of secret-looking environment variables (HF_TOKEN, ...) are redacted",
             "nanochat/storage.py", "        if len(secret) >= 8 and SECRET_ENV.search(name):", "        if False:",
             ("tests/test_storage_faults.py::test_redact",)),
    Breakage("partial-per-user", "a remote cache's partial downloads wait in a temp folder of the user's own", "nanochat/dataset.py",
             'f"nanochat-partial-{os.getuid()}"', '"nanochat-partial"',
             ("tests/test_download.py::test_a_remote_caches_partial_files_are_in_a_folder_of_the_users_own",)),
    # order independence and layout
    Breakage("make-test-env", "`make test` and a plain pytest see the same environment", "Makefile",
             "\tenv $(addprefix -u ,$(TEST_UNSET)) $(PY) -m pytest", "\t$(PY) -m pytest", ("tests/test_make_test.py",)),
    # no hangs: a wait that gives up ends everything it waited on
    Breakage("waits-leave-children", "a wait that gives up leaves no process behind", "tests/support/waiting.py",
             "tree = [root, *root.children(recursive=True)]", "tree = [root]", ("tests/test_waiting.py",)),
    # evaluation: bits per byte, CORE, ChatCORE, GSM8K, HumanEval
    Breakage("bpb-per-byte", "validation bits per byte divides the loss by the bytes the targets stand for, not by their count",
             "nanochat/evaluation/bpb.py", "        n_bytes += weights.sum()", "        n_bytes += (weights > 0).sum()",
             ("tests/test_bpb.py",)),
    Breakage("core-lm-every-token", "a CORE language-modeling example is right only if greedy decoding gives every token",
             "nanochat/evaluation/core.py", "== ids[0, start:end]).all())", "== ids[0, start:end]).any())",
             ("tests/test_core_eval.py::test_language_modeling_needs_exactly_the_continuation",)),
    Breakage("chatcore-centered", "ChatCORE centers each task's accuracy by its chance baseline", "nanochat/evaluation/chatcore.py",
             "centered = [(acc - baselines[name]) / (1 - baselines[name]) for name, acc in accuracies.items()]",
             "centered = [acc for name, acc in accuracies.items()]", ("tests/test_chat_eval.py::test_chatcore_centers_by_chance",)),
    Breakage("chatcore-answer-position", "a categorical task reads the letter logits where the answer begins",
             "nanochat/evaluation/chatcore.py",
             "answer_positions = torch.tensor([len(prompts[k]) - 1 for k in batch]",
             "answer_positions = torch.tensor([len(prompts[k]) - 2 for k in batch]",
             ("tests/test_chat_eval.py::test_categorical_reads_the_letter_logits_at_the_answer",)),
    Breakage("humaneval-runs-tests", "a HumanEval completion passes only if the problem's tests pass in the sandbox", "tasks/humaneval.py",
             "\\n\\ncheck({entry_point})\\n\"", "\\n\"", ("tests/test_tasks.py::test_humaneval_evaluate_in_the_sandbox",)),
    # the inference engine
    Breakage("engine-frequency-penalty", "the frequency penalty grows with a token's count in the completion", "nanochat/engine.py",
             "logits[ids] -= params.frequency_penalty * counts + params.presence_penalty",
             "logits[ids] -= params.frequency_penalty + params.presence_penalty",
             ("tests/test_engine.py::test_penalties_equal_the_uncached_oracle_row_by_row",)),
    Breakage("engine-row-positions", "rows at different positions decode together, each at its own", "nanochat/engine.py",
             "CacheView(self, slice(0, num_rows), lengths[0] if len(set(lengths)) == 1 else lengths)",
             "CacheView(self, slice(0, num_rows), lengths[0])",
             ("tests/test_engine.py::test_cached_batched_greedy_equals_uncached",)),
    Breakage("engine-tool-output", "a python call's result is forced in as <|output_start|> result <|output_end|>", "nanochat/engine.py",
             "            row.forced.extend([self.output_start, *self.tokenizer.encode(result), self.output_end])",
             "            row.forced.extend(self.tokenizer.encode(result))",
             ("tests/test_engine.py::test_python_tool_output_is_forced_in",)),
    Breakage("engine-top-p", "top_p keeps only the smallest set of tokens whose probability reaches it", "nanochat/engine.py",
             "keep = int((cumulative - weights < params.top_p * cumulative[-1]).sum())", "keep = len(weights)",
             ("tests/test_engine.py::test_top_k_and_top_p_restrict_the_choices",)),
    # the tokenizer: what training trains on
    Breakage("tokenizer-user-untrained", "a rendered conversation trains on the assistant's tokens, never the user's",
             "nanochat/tokenizer.py", '*self.enc.encode_ordinary(message["content"]), s["<|user_end|>"]], 0)',
             '*self.enc.encode_ordinary(message["content"]), s["<|user_end|>"]], 1)',
             ("tests/test_tokenizer.py::test_render_conversation_masks",)),
    Breakage("tokenizer-tool-output-untrained", "a rendered conversation never trains on tool output", "nanochat/tokenizer.py",
             'add([s["<|output_start|>"], *text, s["<|output_end|>"]], 0)', 'add([s["<|output_start|>"], *text, s["<|output_end|>"]], 1)',
             ("tests/test_tokenizer.py::test_render_conversation_masks", "tests/test_tasks.py::test_gsm8k_tool_output_is_never_trained")),
    # Hugging Face export and import
    Breakage("export-rotary", "an exported model computes our logits in transformers (q/k turned to its rotary)", "nanochat/hf.py",
             "        tensor = flip_qk(key, tensor, config)\n        out[hf_key(key)]", "        out[hf_key(key)]",
             ("tests/test_hf_export.py::test_logits_equal_ours",)),
    Breakage("export-template-tool-output", "the exported chat template renders tool output as our tokenizer does",
             "nanochat/hf_tokenizer.py", "<|output_start|>{{ part['text'] }}<|output_end|>", "{{ part['text'] }}",
             ("tests/test_hf_export.py::test_chat_template_renders_as_our_tokenizer",)),
    # the dataloader's exact resume
    Breakage("dataloader-resume-buffer", "a resumed pretraining loader re-reads its buffered documents: the same batches follow",
             "nanochat/dataloader.py", "            self._add_docs(epoch, shard, row_group, rows, [texts[r] for r in rows])",
             "            pass", ("tests/test_dataloader.py::test_exact_resume_across_epochs",)),
    # deployments (Kubernetes, multi-node rendezvous, the flow's cache key, notifications), identity data, your own text
    Breakage("k8s-rendezvous-pod-0", "the rendezvous service's name resolves to pod 0 only",
             "deployments/kubernetes/rendezvous-service.yaml",
             '    batch.kubernetes.io/job-completion-index: "0"\n', "",
             ("tests/test_kubernetes.py::test_the_rendezvous_service_selects_pod_0_under_the_jobs_subdomain",)),
    Breakage("rendezvous-per-attempt", "each attempt of a multi-node stage meets under its own rendezvous id", "flows/launch.py",
             'f"{spec.run}\\0{stage.name}\\0{attempt}"', 'f"{spec.run}\\0{stage.name}"',
             ("tests/test_multinode.py::test_every_launch_meets_under_its_own_rendezvous_id",)),
    Breakage("cache-code", "a changed source file runs the stage again (the cache key holds the code's hash)", "flows/stages.py",
             '"code": code_version(commit=False)}', '"code": ""}',
             ("tests/test_cache.py::test_a_changed_source_file_changes_the_key",)),
    Breakage("identity-duplicates", "nanochat identity writes no conversation twice", "nanochat/identity.py",
             "        if k in self.keys:\n            return False\n", "",
             ("tests/test_identity.py::test_endpoint_answers_checked_retried_and_deduplicated",)),
    Breakage("input-error-traceback", "a stage given input it cannot use ends with one line, not a traceback", "nanochat/stage.py",
             "    except (StageError, InputError, storage.StorageError) as e:", "    except (StageError, storage.StorageError) as e:",
             ("tests/test_stage_errors.py::test_input_a_stage_cannot_use_is_one_line",)),
    Breakage("number-range-unchecked", "a count out of its range is a usage error naming the option", "nanochat/training_options.py",
             "        if value != also and not (math.isfinite(value) and least <= value <= most):", "        if False:",
             ("tests/test_stage_errors.py::test_a_number_out_of_range_is_a_usage_error_naming_the_option",)),
    Breakage("help-default-hidden", "a stage's --help gives an option's default where no preset sets it", "nanochat/stage.py",
             "        if shown:\n            action.help", "        if shown and len(shown) == len(values):\n            action.help",
             ("tests/test_presets.py::test_a_stages_help_gives_each_options_value_under_each_preset_and_otherwise",)),
    Breakage("min-chars-ignored", "--min-chars takes only the first shards or files that hold that much text", "nanochat/dataset.py",
             "    if min_chars is None:\n        return candidates", "    if True:\n        return candidates",
             ("tests/test_download.py::test_min_chars_fetches_only_the_first_shards_that_hold_that_much_text",
              "tests/test_own_text.py::test_min_chars_declares_only_the_first_files_that_hold_that_much")),
    Breakage("own-text-validation-last", "of your own text's files, the last in name order is the validation file", "nanochat/sources.py",
             'files = [storage.join(root, name) for name in names if name.endswith(".parquet")]',
             'files = [storage.join(root, name) for name in names[::-1] if name.endswith(".parquet")]',
             ("tests/test_own_text.py::test_a_folder_in_a_bucket_is_planned_as_a_local_one",)),
    Breakage("notify-crashed", "a crashed run posts to the webhook too, not only a failed one", "flows/notify.py",
             '"prefect.state-type": ["FAILED", "CRASHED"]', '"prefect.state-type": ["FAILED"]',
             ("tests/test_notify.py::test_failed_or_crashed_run_posts_once_naming_the_run_and_state[download:hang-Crashed]",)),
    # the training recipe: the optimizer, its schedules, the horizon
    Breakage("adamw-group-weight-decay", "AdamW steps as torch.optim.AdamW at each group's own weight decay", "nanochat/optim.py",
             'weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)', 'weight_decay=0.0, eps=group["eps"], maximize=False)',
             ("tests/test_optim.py::test_groups_and_adamw_equal_upstream_hyperparameters_and_torch_adamw",)),
    Breakage("polar-express-steps", "Muon orthogonalises with all 5 Polar Express iterations", "nanochat/optim.py",
             "for a, b, c in POLAR_EXPRESS_COEFFS[:steps]:", "for a, b, c in POLAR_EXPRESS_COEFFS[:steps - 1]:",
             ("tests/test_optim.py::test_orthogonalize_maps_singular_values_near_one",)),
    Breakage("normuon-beta2", "NorMuon's second moment is a running mean with beta2 (0.9) on the old value", "nanochat/optim.py",
             "keepdim=True), 1 - beta2)", "keepdim=True), beta2)",
             ("tests/test_optim.py::test_each_muon_refinement_equals_its_definition",)),
    Breakage("cautious-decay-sign", "cautious weight decay decays only where the update pulls the weight toward 0", "nanochat/optim.py",
             "params.sub_(params * (update * params >= 0)", "params.sub_(params * (update * params <= 0)",
             ("tests/test_optim.py::test_each_muon_refinement_equals_its_definition",)),
    Breakage("muoneq-off", "the 2026 recipe's MuonEq equilibrates the rows before orthogonalising", "nanochat/optim.py",
             "    if muoneq:\n        update = equilibrate_rows(update)", "    if False:\n        update = equilibrate_rows(update)",
             ("tests/test_optim.py::test_each_muon_refinement_equals_its_definition",)),
    Breakage("zero2-adamw-state", "ZeRO-2: each rank keeps the AdamW state of its share of a large parameter's rows only",
             "nanochat/optim.py", "if self.world_size == 1 or p.numel() < SHARD_MIN_NUMEL", "if True or p.numel() < SHARD_MIN_NUMEL",
             ("tests/test_optim.py::test_state_of_another_world_size_is_refused",)),
    Breakage("allreduce-fallback-share", "without reduce_scatter, a rank updates its own Muon matrices from the all-reduced mean",
             "nanochat/optim.py", "        own = grads[self.rank * chunk:(self.rank + 1) * chunk]\n", "        own = grads[:chunk]\n",
             ("tests/test_optim.py::test_distributed_step_equals_single_process_and_resumes_exactly",)),
    Breakage("optim-other-world-size", "an optimizer state sharded for another number of processes is refused, naming it",
             "nanochat/optim.py", "                if saved is not None and tuple(saved.shape) != shape:", "                if False:",
             ("tests/test_optim.py::test_state_of_another_world_size_is_refused",)),
    Breakage("lr-warmup", "the learning rate warms up linearly over --warmup-steps", "nanochat/optim.py",
             "        return (step + 1) / warmup_steps", "        return 1.0", ("tests/test_optim.py::test_schedules",)),
    Breakage("grad-accumulation", "a step runs grad_accum passes: --total-batch-size tokens whatever the processes",
             "nanochat/training.py", "            for _ in range(plan.grad_accum):", "            for _ in range(1):",
             ("tests/test_chat_rl.py::test_metrics_count_the_sampled_tokens_and_rollouts_autocast_as_training",)),
    Breakage("horizon-weight-decay", "--batch-lr-scaling scales the Muon weight decay by sqrt(B / B_ref) x D_ref / D",
             "nanochat/stages/base_train.py",
             "weight_decay *= lr_scale * (args.param_data_ratio * ref_params) / (batch * num_steps)", "weight_decay *= lr_scale",
             ("tests/test_presets.py::test_d24_is_upstreams_speedrun",)),
    Breakage("horizon-auto-batch", "--total-batch-size -1 takes the batch from the horizon by B ~ D^0.383 from d12's 524,288",
             "nanochat/stages/base_train.py", "BATCH_REF * (params / ref_params) ** 0.383", "BATCH_REF",
             ("tests/test_presets.py::test_d24_is_upstreams_speedrun",)),
    Breakage("scaling-params-lm-head", "the param:data ratio counts the block matrices and the lm_head", "nanochat/gpt.py",
             "return sum(p.numel() for p in self.transformer.h.parameters()) + self.lm_head.weight.numel()",
             "return sum(p.numel() for p in self.transformer.h.parameters())",
             ("tests/test_model_options.py::test_parameter_names_and_counts", "tests/test_presets.py::test_d24_is_upstreams_speedrun")),
    # the model
    Breakage("short-window-128", "the short window is a quarter of the context rounded up to 128", "nanochat/gpt.py",
             "return min(math.ceil(self.sequence_len / 4 / 128) * 128, self.sequence_len)",
             "return min(math.ceil(self.sequence_len / 4), self.sequence_len)",
             ("tests/test_model_options.py::test_windows_per_layer",)),
    Breakage("value-embeds-gate", "value embeddings enter each head gated by 3 sigmoid(gate of the input)", "nanochat/gpt.py",
             "gate = 3 * torch.sigmoid(self.ve_gate(", "gate = 2 * torch.sigmoid(self.ve_gate(",
             ("tests/test_model_options.py::test_each_option_computes_upstreams_formulas",)),
    Breakage("loss-ignored-gradient", "an ignored token (-1) gives no gradient through the fused loss", "nanochat/loss.py",
             "grad_scale = (4.0 * (targets != -1))[:, None]", "grad_scale = (4.0 * (targets != -2))[:, None]",
             ("tests/test_fused_loss.py::test_loss_and_gradients_equal_cross_entropy_of_the_logits",)),
    # the server's worker, storage
    Breakage("serve-queue-full", "a request beyond --max-pending waiting is refused with 429", "nanochat/serve/worker.py",
             "            if len(self.pending) >= self.max_pending:", "            if False:",
             ("tests/test_serve.py::test_full_queue_is_429_and_a_disconnect_cancels",)),
    Breakage("serve-max-seconds", "--max-seconds cuts a request short, its completions ending with length", "nanochat/serve/worker.py",
             "self.deadlines[request] = min(time.monotonic() + self.max_seconds, self.last_deadline)",
             "self.deadlines[request] = self.last_deadline",
             ("tests/test_serve_security.py::test_wall_time_limit_keeps_the_text_and_ends_the_stream",)),
    Breakage("storage-retries", "a transient storage error is retried (3 attempts) before it fails", "nanochat/storage.py",
             'attempts = int(os.environ.get("NANOCHAT_STORAGE_RETRIES", RETRIES))', "attempts = 1",
             ("tests/test_storage_faults.py::test_storage_down_fails_naming_the_file_then_comes_back",)),
    Breakage("redact-userinfo", "a URI's user:password never reaches the logs or stage.json", "nanochat/storage.py",
             'value = SECRET_PARAM.sub(r"\\1***", USERINFO.sub("***@", value))', 'value = SECRET_PARAM.sub(r"\\1***", value)',
             ("tests/test_storage_faults.py::test_stage_fails_while_uploads_fail_then_resumes_and_leaks_no_credentials",)),
]


def copy_of_working_tree(dest):
    """This working tree (its uncommitted changes and new files included) at `dest`, using this
    checkout's .venv and built rustbpe library: a clone of HEAD with the working tree's diff applied."""
    subprocess.run(["git", "clone", "--quiet", "--shared", str(REPO), str(dest)], check=True)
    subprocess.run(["git", "apply", "--allow-empty", "--index"], input=working_tree_diff(), cwd=dest, check=True)
    (dest / ".venv").symlink_to(REPO / ".venv")
    shutil.copytree(REPO / NATIVE, dest / NATIVE)  # maturin's build of rustbpe, ignored by git


def apply(breakage, root):
    path = root / breakage.path
    text = path.read_text()
    if text.count(breakage.old) != 1:
        raise SystemExit(f"{breakage.name}: {breakage.path} no longer holds the text to break exactly once; update tests/breakages.py")
    path.write_text(text.replace(breakage.old, breakage.new))


def run_tests(breakage, root):
    """pytest on the breakage's tests in the copy (its packages first on every process's path):
    (caught, seconds, the tests that failed and pytest's last line)."""
    data = os.environ.get("NANOCHAT_TEST_DATA") or REPO.parent / "shared" / "data"  # as tests/conftest.py finds it
    env = {**os.environ, "PYTHONPATH": str(root), "CI": "true", "NANOCHAT_TEST_DATA": str(Path(data).resolve())}
    start = time.monotonic()
    done = subprocess.run([str(root / ".venv" / "bin" / "python"), "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                           "-rfE", "-o", "addopts=", *breakage.tests], cwd=root, env=env, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    tail = "\n".join([line for line in lines if line.startswith(("FAILED", "ERROR"))] + lines[-1:])
    # a test failed on its own assertion; errors (collection, a fixture, the setup) prove nothing
    return done.returncode == 1 and "\nFAILED " in f"\n{tail}", time.monotonic() - start, tail


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="breakages to make (default: all)")
    parser.add_argument("--list", action="store_true", help="list the breakages and the promise each breaks")
    args = parser.parse_args(argv)
    by_name = {b.name: b for b in BREAKAGES}
    unknown = [n for n in args.names if n not in by_name]
    if unknown:
        parser.error(f"no breakage named {', '.join(unknown)} (--list names them)")
    chosen = [by_name[n] for n in args.names] or BREAKAGES
    if args.list:
        for b in chosen:
            print(f"{b.name:24} {b.promise}")
        return 0
    missed = []
    for b in chosen:
        with tempfile.TemporaryDirectory(prefix=f"breakage-{b.name}-") as tmp:
            os.chmod(tmp, 0o755)  # the sandbox tests' unprivileged user reads the copy too
            root = Path(tmp) / "nanochat"
            copy_of_working_tree(root)
            apply(b, root)
            caught, seconds, tail = run_tests(b, root)
        print(f"{'caught' if caught else 'MISSED':6} {b.name:24} {seconds:5.0f} s  {b.promise}\n{tail}\n", flush=True)
        if not caught:
            missed.append(b.name)
    if missed:
        print(f"not caught: {', '.join(missed)}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
