"""The run stage: plan a suite (`plan`, `plan_gpu`), make and resume run directories (`directory`), launch them
(`launch`, `lock`), run the sweep (`sweep`, `video_eval`) and store its rows (`results`)."""
