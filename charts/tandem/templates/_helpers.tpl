{{/* Names, labels and the image reference shared by the templates. */}}

{{- define "tandem.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The operator's objects: "<release>-tandem-operator", or "tandem-operator" for a release named tandem. */}}
{{- define "tandem.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if eq .Release.Name (include "tandem.name" .) -}}
{{- printf "%s-operator" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s-operator" .Release.Name (include "tandem.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "tandem.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Selector labels of the operator's pods: never change them (a Deployment's selector is immutable).
Every name in the templates is quoted: a release, namespace or value such as 2024, no or 1e3 would
otherwise be read back as a number or a boolean, which the API server refuses where it wants a string.
*/}}
{{- define "tandem.selectorLabels" -}}
app.kubernetes.io/name: {{ printf "%s-operator" (include "tandem.name" .) | quote }}
app.kubernetes.io/instance: {{ .Release.Name | quote }}
{{- end -}}

{{- define "tandem.labels" -}}
{{ include "tandem.selectorLabels" . }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: tandem
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service | quote }}
helm.sh/chart: {{ include "tandem.chart" . | quote }}
{{- end -}}

{{/* Labels of objects that are not part of the operator (monitors, policies, dashboard). */}}
{{- define "tandem.commonLabels" -}}
app.kubernetes.io/name: {{ include "tandem.name" . | quote }}
app.kubernetes.io/instance: {{ .Release.Name | quote }}
app.kubernetes.io/part-of: tandem
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service | quote }}
helm.sh/chart: {{ include "tandem.chart" . | quote }}
{{- end -}}

{{- define "tandem.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "tandem.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- /* rbac.create refuses this default (tandem.validate): only your own RBAC may bind it. */ -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "tandem.peeringName" -}}
{{- default (include "tandem.fullname" .) .Values.peering.name -}}
{{- end -}}

{{- define "tandem.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if .Values.image.digest -}}
{{- printf "%s:%s@%s" .Values.image.repository $tag .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/*
The labels the operator puts on every child of a ModelDeployment (operator/src/tandem_operator/builders.py:
build_labels). Monitors and policies select Tandem's pods by them.
*/}}
{{- define "tandem.workloadLabels" -}}
app.kubernetes.io/part-of: tandem
app.kubernetes.io/managed-by: tandem-operator
{{- end -}}

{{/*
The operator's RBAC rules, the same as manifests/rbac.yaml (a test checks). `peerings` is the peering
resource: clusterkopfpeerings (all namespaces) or kopfpeerings (namespaced mode).
*/}}
{{- define "tandem.rules" -}}
# Watch ModelDeployments (Kopf), read one per pass, write only its status.
- apiGroups: ["tandem.dev"]
  resources: ["modeldeployments"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["tandem.dev"]
  resources: ["modeldeployments/status"]
  verbs: ["patch"]
# Children carry blockOwnerDeletion, which OwnerReferencesPermissionEnforcement (on in OpenShift)
# allows only to whoever may update the owner's finalizers.
- apiGroups: ["tandem.dev"]
  resources: ["modeldeployments/finalizers"]
  verbs: ["update"]
# The children: watched, read, created, patched, and deleted when a spec no longer wants them.
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["services", "configmaps", "serviceaccounts"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Worker health (the WorkersHealthy condition): one list of the object's pods per pass.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list"]
# Warning Events about bad specs.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
# Kopf peering: replicas announce themselves so that only one acts.
- apiGroups: ["kopf.dev"]
  resources: [{{ .peerings | quote }}]
  verbs: ["get", "list", "watch", "patch"]
{{- end -}}

{{/*
A Prometheus duration ("1h30m", "500ms", "0"; values.schema.json has already checked its form) in
milliseconds, to compare two of them.
*/}}
{{- define "tandem.durationMs" -}}
{{- $unitMs := dict "y" 31536000000 "w" 604800000 "d" 86400000 "h" 3600000 "m" 60000 "s" 1000 "ms" 1 -}}
{{- $total := 0 -}}
{{- /* "ms" first: RE2 takes the first alternative that matches, and "5ms" is not five minutes. */ -}}
{{- range $part := regexFindAll "[0-9]+(ms|[ywdhms])" . -1 -}}
{{- $count := regexFind "^[0-9]+" $part -}}
{{- $total = add $total (mul (atoi $count) (get $unitMs (trimPrefix $count $part))) -}}
{{- end -}}
{{- $total -}}
{{- end -}}

{{/* Refuse value combinations the schema cannot express. */}}
{{- define "tandem.validate" -}}
{{- if and (not .Values.peering.enabled) (gt (int .Values.replicaCount) 1) -}}
{{- fail "replicaCount > 1 needs peering.enabled: without peering every replica would act on every ModelDeployment" -}}
{{- end -}}
{{- if and .Values.networkPolicy.enabled (not .Values.networkPolicy.modelDeployments) -}}
{{- fail "networkPolicy.enabled needs networkPolicy.modelDeployments: [{name, namespace}, ...]" -}}
{{- end -}}
{{- if and .Values.monitoring.serviceMonitor.enabled .Values.monitoring.podMonitor.enabled -}}
{{- fail "enable monitoring.serviceMonitor or monitoring.podMonitor, not both: each pod would be scraped twice" -}}
{{- end -}}
{{- range $kind := list "serviceMonitor" "podMonitor" -}}
{{- $monitor := index $.Values.monitoring $kind -}}
{{- if $monitor.enabled -}}
{{- $interval := include "tandem.durationMs" $monitor.interval | atoi -}}
{{- $timeout := include "tandem.durationMs" $monitor.scrapeTimeout | atoi -}}
{{- /* 0 stands for Prometheus' global setting, which the chart cannot see. */ -}}
{{- if and $interval $timeout (gt $timeout $interval) -}}
{{- fail (printf "monitoring.%s.scrapeTimeout (%s) is longer than monitoring.%s.interval (%s): Prometheus refuses such a scrape config" $kind $monitor.scrapeTimeout $kind $monitor.interval) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and .Values.rbac.create (not .Values.serviceAccount.create) (not .Values.serviceAccount.name) -}}
{{- fail "serviceAccount.create: false with rbac.create needs serviceAccount.name, the existing account to run as and bind: without it the operator's role is bound to the namespace's default ServiceAccount, and so to every pod that runs as it" -}}
{{- end -}}
{{- /* A pod label may not replace one of the chart's: the selector would no longer match its own pods. */ -}}
{{- $own := include "tandem.labels" . | fromYaml -}}
{{- range $key, $_ := .Values.podLabels -}}
{{- if hasKey $own $key -}}
{{- fail (printf "podLabels: %s is one of the chart's own pod labels (%s); choose another key" $key (keys $own | sortAlpha | join ", ")) -}}
{{- end -}}
{{- end -}}
{{- end -}}
