package keystore

import "errors"

// Sentinel errors. Backends wrap them with %w and add what the user should do
// next, so callers test with errors.Is and show err.Error() to people.
var (
	// ErrBadURI: the key URI could not be parsed or misses a required part.
	ErrBadURI = errors.New("malformed key URI")
	// ErrUnknownScheme: the URI's scheme names no backend.
	ErrUnknownScheme = errors.New("unknown key URI scheme")
	// ErrNotCompiled: the backend was left out of this build (build tags).
	ErrNotCompiled = errors.New("key backend not compiled into this build")
	// ErrKeyNotFound: no key at the location the URI names.
	ErrKeyNotFound = errors.New("key not found")
	// ErrKeyExists: CreateKey found a key already at that location.
	ErrKeyExists = errors.New("key already exists")
	// ErrDeviceAbsent: the TPM device, socket or PKCS#11 module is missing.
	ErrDeviceAbsent = errors.New("key device not available")
	// ErrDeviceBusy: the device exists but could not be opened or is in use.
	ErrDeviceBusy = errors.New("key device busy")
	// ErrUnsupportedCurve: the device cannot do ECDSA on NIST P-384.
	ErrUnsupportedCurve = errors.New("NIST P-384 not supported by key device")
	// ErrTokenAbsent: no PKCS#11 token with the given label or serial.
	ErrTokenAbsent = errors.New("PKCS#11 token not found")
	// ErrBadPIN: the PIN was rejected or could not be read.
	ErrBadPIN = errors.New("PIN rejected")
	// ErrInsecureKeyFile: a software key file is readable by group or others.
	ErrInsecureKeyFile = errors.New("key file permissions too open")
	// ErrUnsupportedHash: Sign was asked for a digest other than SHA-384
	// (or SHA-256 where the backend allows it).
	ErrUnsupportedHash = errors.New("unsupported signature hash")
)
