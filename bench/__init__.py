"""GPU benchmarks of minisd side by side with diffusers + peft (issue 6). See bench/README.md."""
