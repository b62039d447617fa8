// Package provisioning turns an on-device key into an operational
// certificate: it builds the PKCS#10 CSR, registers with Azure IoT Hub DPS
// over MQTT or HTTPS with the onboarding credential (X.509, symmetric key or
// TPM attestation), validates the issued chain and stores it atomically.
//
// It imports keystore for interfaces and types only, never a backend, and
// never logs: progress is reported through callbacks the caller supplies.
// Importers: agent and cmd/gwagent.
package provisioning
