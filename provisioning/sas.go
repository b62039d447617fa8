package provisioning

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"fmt"
	"strings"
	"time"
)

// SymmetricKey is a DPS symmetric-key onboarding credential. It never
// prints its key: String and GoString show only the kind.
type SymmetricKey struct {
	key []byte
}

// ParseSymmetricKey decodes a base64 device key. If group is true the key
// is an enrollment-group key and the device key is derived from it for
// registrationID (HMAC-SHA256 over the registration id, as DPS does).
func ParseSymmetricKey(b64 string, group bool, registrationID string) (SymmetricKey, error) {
	k, err := base64.StdEncoding.DecodeString(strings.TrimSpace(b64))
	if err != nil || len(k) == 0 {
		return SymmetricKey{}, fmt.Errorf("symmetric key is not base64 (the key file must hold the key as the Azure portal shows it)")
	}
	if group {
		k = deriveKey(k, registrationID)
	}
	return SymmetricKey{key: k}, nil
}

// DeriveDeviceKey returns the base64 device key DPS derives from an
// enrollment-group key for one registration id.
func DeriveDeviceKey(groupKeyB64, registrationID string) (string, error) {
	k, err := base64.StdEncoding.DecodeString(strings.TrimSpace(groupKeyB64))
	if err != nil {
		return "", fmt.Errorf("group key is not base64")
	}
	return base64.StdEncoding.EncodeToString(deriveKey(k, registrationID)), nil
}

func deriveKey(groupKey []byte, registrationID string) []byte {
	m := hmac.New(sha256.New, groupKey)
	m.Write([]byte(registrationID))
	return m.Sum(nil)
}

func (SymmetricKey) String() string   { return "SymmetricKey(REDACTED)" }
func (SymmetricKey) GoString() string { return "SymmetricKey(REDACTED)" }

// DPSToken returns a DPS SAS token for {idScope}/registrations/{regID},
// valid until expiry: sr, sig, se, skn=registration.
func (k SymmetricKey) DPSToken(idScope, regID string, expiry time.Time) string {
	return k.token(idScope+"/registrations/"+regID, expiry, "registration")
}

// HubToken returns an IoT Hub device SAS token for {host}/devices/{id}.
func (k SymmetricKey) HubToken(host, deviceID string, expiry time.Time) string {
	return k.token(host+"/devices/"+deviceID, expiry, "")
}

func (k SymmetricKey) token(resource string, expiry time.Time, skn string) string {
	t, _ := sasToken(resource, expiry, skn, hmacSHA256(k.key)) // signing in memory cannot fail
	return t
}
