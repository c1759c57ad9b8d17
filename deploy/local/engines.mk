# Real engines on this machine (no containers); included from the top Makefile.
# Subset with ENGINES="minio seaweed es spark"; see deploy/local/engines.sh for the other knobs.
ENGINES_SH := $(dir $(lastword $(MAKEFILE_LIST)))engines.sh

.PHONY: engines-up engines-down engines-status engines-clean

engines-up: ## Install (cached) and start the real engines, waiting until they are healthy
	$(ENGINES_SH) up

engines-down: ## Stop the engines that engines-up started; data is kept
	$(ENGINES_SH) down

engines-status: ## Show each engine's health, endpoint and the processes we started
	$(ENGINES_SH) status

engines-clean: ## Stop the engines and delete their data (binaries stay cached)
	$(ENGINES_SH) clean
