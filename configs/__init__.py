"""Run configs and rulebooks (YAML), shipped with the package as `afrl_fast_configs` so a regular
(non-editable) install finds the default rulebook and the demo config."""
