{{/*
The webhook's name: its Service, its --name and both webhook configurations. One helper,
so the Service the configurations point at is the Service the chart creates.
*/}}
{{- define "vm-dhcp.webhookName" -}}
{{- $name := .Values.webhook.service.name | default (printf "%s-webhook" .Release.Name) -}}
{{- if gt (len $name) 63 -}}
{{- fail (printf "webhook Service name %q is longer than 63 characters: set webhook.service.name" $name) -}}
{{- end -}}
{{- $name -}}
{{- end -}}

{{/*
The cert-manager Certificate whose CA cainjector copies into the configurations.
*/}}
{{- define "vm-dhcp.webhookCertificate" -}}
{{- .Values.webhook.tls.certManager.certificate | default (include "vm-dhcp.webhookName" .) -}}
{{- end -}}
