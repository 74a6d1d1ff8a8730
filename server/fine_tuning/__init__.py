"""OpenAI's files and fine-tuning API over the MeZO jobs: uploads, training files in OpenAI's formats, jobs,
their events and checkpoints, and the fine-tuned model names."""
