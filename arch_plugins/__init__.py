"""The built-in arch plugins: arm (ARMv7 LPAE), arm64 and x86 (EPT)."""
