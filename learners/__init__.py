"""Learners: token losses, batching of trajectory records, LoRA adapter publishing, the DeepSpeed learner.

Modules: losses (pure tensor functions), batching (TokenSample, actor/reflector samples, padded batches),
adapters (PEFT adapter folders), learner (Learner).
Nothing is imported here so `import learners` stays light (DeepSpeed loads only with learners.learner).
"""
