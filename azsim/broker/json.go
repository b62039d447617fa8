package broker

import (
	"encoding/json"
	"net/http"
)

// WriteJSON writes v as indented JSON with status; azsim's admin handlers
// share it.
func WriteJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}
